"""Service mode end to end, on both profiles: the services ``make up`` runs, driven through the REST API.

``embedded``: SQLite for Airflow, MLflow and the lease store, LocalExecutor. ``prod``: PostgreSQL for all three
(fresh databases), CeleryExecutor with two workers on a Redis broker (a queue of their own). In each, the tabular
pipeline is triggered with the official ``apache-airflow-client`` and must succeed with its outputs reachable from
the run (gate decision, metrics, links to the MLflow run and the validation report); bad conf is refused by the
Params schema; an Asset event starts a run; and ``down`` leaves no process behind.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import airflow_client.client as ac
import httpx
import pytest
import yaml
from airflow_client.client.api.asset_api import AssetApi
from airflow_client.client.api.dag_api import DAGApi
from airflow_client.client.api.dag_run_api import DagRunApi
from airflow_client.client.api.task_instance_api import TaskInstanceApi
from airflow_client.client.api.x_com_api import XComApi
from airflow_client.client.models.create_asset_events_body import CreateAssetEventsBody
from airflow_client.client.models.dag_run_mutable_states import DagRunMutableStates
from airflow_client.client.models.dag_run_patch_body import DAGRunPatchBody
from kiln_service import EXAMPLE_SPECS, REPO, Platform, running_service

from kiln.tasks.processes import alive, process_tree

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

DAG_ID = "penguins_species"
ASSET = "kiln://penguins/raw"
#: Quick but real: enough epochs to pass the spec's thresholds, one worker process.
CONF = {"epochs": 20, "nproc": 1}


@pytest.fixture(scope="module", params=["embedded", "prod"])
def platform(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The platform's services on one profile, with the penguins pipeline also fed by an Asset."""
    tmp = tmp_path_factory.mktemp(f"service-{request.param}")
    spec = yaml.safe_load((EXAMPLE_SPECS / f"{DAG_ID}.yaml").read_text())
    spec["asset"] = ASSET
    (tmp / "specs").mkdir()
    (tmp / "specs" / f"{DAG_ID}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    started = time.monotonic()
    with running_service(tmp, profile=request.param, specs=[tmp / "specs" / f"{DAG_ID}.yaml"]) as platform:
        log.info("%s profile ready in %.1f s", request.param, time.monotonic() - started)
        yield platform


def _wait_for_dag(platform: Platform, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            DAGApi(platform.api).get_dag(DAG_ID)
            return
        except ac.ApiException as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def test_rest_trigger_runs_the_tabular_pipeline(platform: Platform) -> None:
    _wait_for_dag(platform)
    run_id = platform.trigger(DAG_ID, CONF)
    assert platform.wait(DAG_ID, run_id) == "success", platform.service.log_tails()

    run = DagRunApi(platform.api).get_dag_run(DAG_ID, run_id)
    assert run.conf == CONF
    tis = TaskInstanceApi(platform.api).get_task_instances(DAG_ID, run_id).task_instances
    states = {ti.task_id: ti.state.value for ti in tis}
    assert len(states) == 12 and set(states.values()) == {"success"}, states

    xcom = XComApi(platform.api)
    decision = xcom.get_xcom_entry(DAG_ID, "gate", run_id, "return_value", deserialize=True).actual_instance.value
    decision = json.loads(decision) if isinstance(decision, str) else decision
    assert decision["passed"] is True, decision
    assert decision["candidate_metrics"]["accuracy"] >= 0.9

    # The UI's buttons: links to the run's MLflow run, its validation report and gate decision, all live.
    instances = TaskInstanceApi(platform.api)
    gate_links = instances.get_extra_links(DAG_ID, run_id, "gate").extra_links
    validate_links = instances.get_extra_links(DAG_ID, run_id, "validate").extra_links
    mlflow_url = platform.service.mlflow_url
    assert gate_links["MLflow run"].startswith(f"{mlflow_url}/#/experiments/")
    assert gate_links["Gate decision"].endswith("/artifactPath/gate/decision.json")
    assert validate_links["Validation report"].endswith("/artifactPath/validation/validation.json")
    mlflow_run_id = gate_links["MLflow run"].rsplit("/runs/", 1)[1]
    # MLflow asks for a login: a person's, from the generated credentials.
    users = json.loads((platform.home / "secrets" / "mlflow.json").read_text())
    with httpx.Client(base_url=mlflow_url, timeout=30, auth=("admin", users["admin"])) as mlflow:
        for path, key in (("gate/decision.json", "checks"), ("validation/validation.json", "expectations")):
            artifact = mlflow.get("/get-artifact", params={"path": path, "run_uuid": mlflow_run_id})
            assert artifact.status_code == 200 and key in artifact.json(), (path, artifact.text[:300])
        run_info = mlflow.get("/api/2.0/mlflow/runs/get", params={"run_id": mlflow_run_id}).json()["run"]
    logged = {m["key"]: m["value"] for m in run_info["data"]["metrics"]}
    assert logged["test/accuracy"] == pytest.approx(decision["candidate_metrics"]["accuracy"])


def test_a_run_leaves_private_state_and_a_model_server_without_airflow_secrets(platform: Platform) -> None:
    """After the REST run above: its task logs are private, and the model server its deploy task started (a process
    forked from Airflow's) inherited none of Airflow's secrets."""
    home = platform.home
    logs = [home / "airflow" / "logs", *(home / "airflow" / "logs").rglob("*")]
    assert any(p.name.endswith(".log") for p in logs)
    wrong = {str(p.relative_to(home)): oct(stat.S_IMODE(p.stat().st_mode)) for p in logs
             if stat.S_IMODE(p.stat().st_mode) != (0o700 if p.is_dir() else 0o600)}
    assert wrong == {}
    if platform.service.settings.profile == "embedded":
        assert stat.S_IMODE((home / "pools.db").stat().st_mode) == 0o600
    pid = int((home / "serving" / DAG_ID / "server.pid").read_text())
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    keys = json.loads((home / "secrets" / "airflow.json").read_text())
    held = [name for name in ("fernet_key", "jwt_secret", "api_secret") if keys[name].encode() in raw]
    assert held == [], f"the model server (pid {pid}) holds Airflow's {held}"
    assert b"AIRFLOW__CORE__FERNET_KEY=" not in raw and b"AIRFLOW__API_AUTH__JWT_SECRET=" not in raw


@pytest.mark.parametrize(("conf", "message"), [
    ({"epochs": 0}, "Invalid input for param epochs: 0 is less than the minimum of 1"),
    ({"launcher": "k8s"}, "Invalid input for param launcher: 'k8s' is not one of ['local', 'docker']"),
    ({"sample_fraction": 2}, "Invalid input for param sample_fraction: 2 is greater than the maximum of 1"),
], ids=["below-minimum", "not-in-enum", "above-maximum"])
def test_invalid_conf_is_refused_with_the_schema_message(platform: Platform, conf: dict, message: str) -> None:
    with pytest.raises(ac.ApiException) as raised:
        platform.trigger(DAG_ID, conf)
    assert raised.value.status == 400
    assert message in json.loads(raised.value.body)["detail"]


def test_dag_shows_doc_tags_and_typed_params(platform: Platform) -> None:
    details = DAGApi(platform.api).get_dag_details(DAG_ID)
    assert "Classify penguin **species**" in details.doc_md
    assert {"kiln", "tabular", "classification"} <= {t.name for t in details.tags}
    assert details.params["epochs"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 10_000,
                                                  "title": "Epochs",
                                                  "description_md": "Passes over the training split."}
    assert details.params["epochs"]["description"] == "Passes over the training split."
    assert details.params["deployment"]["schema"]["enum"] == ["direct", "canary", "none"]


def test_an_asset_event_starts_a_run(platform: Platform) -> None:
    assets = AssetApi(platform.api)
    found = assets.get_assets(uri_pattern=ASSET).assets
    assert [a.uri for a in found] == [ASSET]
    before = {r.dag_run_id for r in DagRunApi(platform.api).get_dag_runs(DAG_ID).dag_runs}
    assets.create_asset_event(CreateAssetEventsBody(asset_id=found[0].id, extra={"rows": 344}))
    deadline = time.monotonic() + 60
    while not (new := [r for r in DagRunApi(platform.api).get_dag_runs(DAG_ID).dag_runs
                       if r.dag_run_id not in before]):
        assert time.monotonic() < deadline, "no run 60 s after the asset event"
        time.sleep(0.5)
    assert new[0].run_type.value == "asset_triggered"
    # The run uses the spec's defaults: no need to finish it here (the REST test covers a whole run).
    DagRunApi(platform.api).patch_dag_run(DAG_ID, new[0].dag_run_id,
                                          DAGRunPatchBody(state=DagRunMutableStates.FAILED))


#: A YAML alias bomb of about 600 bytes: nine levels of nine aliases, 9**9 strings once expanded.
BOMB = "\n".join(["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]",
                  *(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)),
                  "name: bomb", "source: {uri: x.csv}", "target: y", "tags: *a8"]) + "\n"


def test_an_alias_bomb_is_named_and_the_other_pipelines_keep_triggering(platform: Platform) -> None:
    """A hostile spec dropped into the pipelines folder of running services: the error DAG names it within a parse
    or two, and the valid pipeline stays in Airflow and takes REST triggers throughout."""
    from airflow_client.client.api.import_error_api import ImportErrorApi

    bomb = platform.pipelines_dir / "bomb.yaml"
    bomb.write_text(BOMB)
    try:
        started = time.monotonic()
        while not [e for e in ImportErrorApi(platform.api).get_import_errors().import_errors
                   if "bomb.yaml" in (e.stack_trace or "")]:
            assert time.monotonic() - started < 120, "no import error names bomb.yaml 120 s after it appeared"
            time.sleep(1)
        log.info("the bomb was named %.1f s after it appeared", time.monotonic() - started)
        run_id = platform.trigger(DAG_ID, CONF)
        DagRunApi(platform.api).patch_dag_run(DAG_ID, run_id, DAGRunPatchBody(state=DagRunMutableStates.FAILED))
        assert DAGApi(platform.api).get_dag(DAG_ID).dag_id == DAG_ID
    finally:
        bomb.unlink()


def test_down_stops_everything_and_status_says_so(platform: Platform) -> None:
    service = platform.service
    env = {**service.env, "PYTHONPATH": str(REPO)}
    status = subprocess.run([sys.executable, "-m", "kiln.tasks.services.supervisor", "status"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and json.loads(status.stdout)["running"] is True
    groups = set(service.state()["pids"].values())
    members = process_tree(groups)
    assert len(members) > len(groups), "components run worker processes of their own"
    service.down()
    left = [pid for pid in members if alive(pid)]
    assert left == [], "processes survived down()"
    assert process_tree(groups) == set()
    status = subprocess.run([sys.executable, "-m", "kiln.tasks.services.supervisor", "status"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 3 and json.loads(status.stdout)["running"] is False
    assert not os.path.exists(Path(service.paths.run_dir) / "service.json")

