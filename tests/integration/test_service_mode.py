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
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import airflow_client.client as ac
import httpx
import pandas as pd
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
from pool_audit import replay
from service_traffic import captured_rows, penguin_rows, samples, send

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
    # Every answer captured, and a monitor that retrains on the labelled traffic; it runs only when triggered here
    # (its cron is New Year's midnight), so no timed run can take the retrain's cool-down.
    spec["deployment"]["capture_share"] = 1.0
    spec["monitoring"].update(schedule="0 0 1 1 *", on_breach="retrain",
                              retrain={"cooldown_hours": 6, "append_labelled": True})
    # The retrain run takes the spec's defaults: quick ones.
    spec["training"].update(epochs=15, nproc=1)
    # Heavier penguins are still penguins: the retrain on the heavier labelled rows must reach its gate.
    spec["expectations"]["declared"][0]["kwargs"]["max_value"] = 10_000
    (tmp / "specs").mkdir()
    (tmp / "specs" / f"{DAG_ID}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp / "specs" / f"{TUNED}.yaml").write_text(yaml.safe_dump(_tuned_spec(), sort_keys=False))
    (tmp / "specs" / f"{URGENT}.yaml").write_text(yaml.safe_dump(_registered_copy(URGENT), sort_keys=False))
    started = time.monotonic()
    with running_service(tmp, profile=request.param,
                         specs=[tmp / "specs" / f"{name}.yaml" for name in (DAG_ID, TUNED, URGENT)]) as platform:
        log.info("%s profile ready in %.1f s", request.param, time.monotonic() - started)
        yield platform


#: A tuned copy of the penguins pipeline, and one whose training outranks the tuned one's trials (both registered,
#: not served: one model server per platform here).
TUNED, URGENT = "penguins_tuned", "penguins_urgent"


def _registered_copy(name: str) -> dict:
    """The penguins pipeline as ``name``: registered and gated, not served, not watched; one rank per job."""
    spec = yaml.safe_load((EXAMPLE_SPECS / f"{DAG_ID}.yaml").read_text())
    spec.update(name=name, deployment={"strategy": "none"})
    spec["training"].update(epochs=8, nproc=1)
    spec["evaluation"]["thresholds"] = {"accuracy": 0.7}
    spec["evaluation"]["gate"].pop("slices")
    spec.pop("monitoring")
    return spec


def _tuned_spec() -> dict:
    spec = _registered_copy(TUNED)
    spec["tuning"] = {"space": {"training.learning_rate": {"type": "log_uniform", "low": 1e-4, "high": 0.05}},
                      "objective": {"metric": "val/accuracy"}, "trials": 4, "parallel": 2, "pruner": "median",
                      "seed": 5}
    return spec


def _wait_for_dag(platform: Platform, timeout: float = 90.0, dag_id: str = DAG_ID) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            DAGApi(platform.api).get_dag(dag_id)
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


MONITOR = f"{DAG_ID}_monitor"
RETRAIN = f"kiln://{DAG_ID}/retrain"


def _monitor(platform: Platform) -> tuple[dict, dict[str, str]]:
    """Run the monitor DAG once through REST (its window ends at the trigger's time: after the traffic sent) and
    return its ``monitor`` XCom and every task's state."""
    run_id = platform.trigger(MONITOR)
    assert platform.wait(MONITOR, run_id, timeout=300) == "success", platform.service.log_tails()
    states = {ti.task_id: ti.state.value
              for ti in TaskInstanceApi(platform.api).get_task_instances(MONITOR, run_id).task_instances}
    value = XComApi(platform.api).get_xcom_entry(MONITOR, "monitor", run_id, "return_value",
                                                 deserialize=True).actual_instance.value
    return (json.loads(value) if isinstance(value, str) else value), states


@pytest.mark.parametrize("platform", ["embedded"], indirect=True)  # the loop is the same on both profiles
def test_the_served_model_is_watched_and_drift_starts_a_gated_retrain_on_the_labelled_traffic(
        platform: Platform) -> None:
    """The issue's whole loop on the running platform, after the REST run above deployed the model: the model
    server captures real traffic; the monitor DAG finds none of its own rows drifted; shifted traffic (body mass +30
    %, an island never seen) drifts on exactly those two features, in the report, the XCom and the server's gauges;
    the retrain Asset event starts the pipeline's own run, which appends the labelled rows and whose gate decides;
    a second breach in the cool-down starts nothing."""
    from kiln.tasks.settings import get_settings
    from kiln.tasks.storage.artifacts import read_json, run_key

    settings = get_settings(platform.service.env)
    artifacts = Path(settings.artifact_root)
    rows = penguin_rows()
    # The rollout's verify step probed the endpoint already: those answers were captured too (infra validation's
    # throwaway server captures nothing).
    sent = captured_rows(platform, artifacts / DAG_ID) + send(platform, rows, labels=False)
    assert [p.name for p in (artifacts / DAG_ID / "_capture").iterdir()] == ["version=1"]
    calm, states = _monitor(platform)
    assert (calm["breach"], calm["latest"]["rows"], states["retrain"]) == (False, sent, "skipped"), calm
    assert not [f for f, v in calm["latest"]["features"].items() if v["drift"]]

    shifted = pd.concat([rows, rows], ignore_index=True)
    shifted["body_mass_g"] = shifted["body_mass_g"] * 1.3
    shifted.loc[shifted.index % 3 == 0, "island"] = "Anvers"
    unseen, known = shifted[shifted["island"] == "Anvers"], shifted[shifted["island"] != "Anvers"]
    # Labels come back for the requests of known islands (an unseen island would stop the retrain at validate).
    sent += send(platform, unseen, labels=False) + send(platform, known, labels=True)
    before = {r.dag_run_id for r in DagRunApi(platform.api).get_dag_runs(DAG_ID).dag_runs}
    breach, states = _monitor(platform)
    assert (breach["breach"], breach["retrain_requested"], states["retrain"]) == (True, True, "success"), breach
    drifted = sorted(f for f, v in breach["latest"]["features"].items() if v["drift"])
    assert drifted == ["body_mass_g", "island"], breach["latest"]["features"]
    report = read_json(artifacts / breach["report_key"] / "report.json")
    assert sorted(report["drifted"]) == drifted and report["rows"] == sent
    assert breach["labelled_rows"] == len(known)
    with httpx.Client(base_url=f"http://127.0.0.1:{settings.serve_port}", timeout=30) as server:
        gauges = samples(server)  # /metrics is open; the server reads latest.json when scraped
    assert gauges[("kiln_monitor_breach", None)] == 1 and gauges[("kiln_monitor_rows", None)] == sent
    assert {f for (name, f), v in gauges.items() if name == "kiln_monitor_feature_drift" and v == 1} == set(drifted)
    assert gauges[("kiln_monitor_feature_psi", "body_mass_g")] == pytest.approx(
        breach["latest"]["features"]["body_mass_g"]["psi"])

    # A second breach at once, inside the cool-down (the retrain run has not deployed anything yet): no request.
    again, states = _monitor(platform)
    assert (again["breach"], again["retrain_requested"], states["retrain"]) == (True, False, "skipped"), again

    deadline = time.monotonic() + 60
    while not (new := [r for r in DagRunApi(platform.api).get_dag_runs(DAG_ID).dag_runs
                       if r.dag_run_id not in before]):
        assert time.monotonic() < deadline, "no pipeline run 60 s after the retrain event"
        time.sleep(0.5)
    assert len(new) == 1 and new[0].run_type.value == "asset_triggered", new
    retrain = new[0].dag_run_id
    assert platform.wait(DAG_ID, retrain, timeout=600) == "success", platform.service.log_tails()
    decision = XComApi(platform.api).get_xcom_entry(DAG_ID, "gate", retrain, "return_value",
                                                    deserialize=True).actual_instance.value
    decision = json.loads(decision) if isinstance(decision, str) else decision
    assert isinstance(decision["passed"], bool) and decision["reason"] and decision["champion"] is not None
    manifest = read_json(artifacts / run_key(DAG_ID, retrain) / "ingest" / "manifest.json")
    assert [a["rows"] for a in manifest["appended"]] == [len(known)]
    assert manifest["rows"] == len(rows) + len(known)
    assert {r.dag_run_id for r in DagRunApi(platform.api).get_dag_runs(DAG_ID).dag_runs} == before | {retrain}


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


def test_a_study_trains_two_trials_at_once_survives_its_scheduler_and_registers_the_best(platform: Platform) -> None:
    """The tuned pipeline on the running platform: its mapped trials run two at once on leased devices (the
    scheduler and workers, not ``dag.test``), the study lives in the lease store's database (PostgreSQL on prod);
    the scheduler and the triggerer are killed mid-study and started again, and the study goes on with its finished
    trials kept and no trial number twice; the best trial goes through evaluate, register and gate."""
    from kiln.tasks.settings import get_settings
    from kiln.tasks.spec import parse_spec
    from kiln.tasks.storage.artifacts import run_key
    from kiln.tasks.tuning import open_study

    if platform.service.settings.profile == "embedded":
        pytest.skip("the embedded profile's study (SQLite, one process) is test_tuning_dag.py's; this runs on prod, "
                    "where the trials are Celery tasks and the study lives on PostgreSQL (2 minutes of suite time)")
    _wait_for_dag(platform, dag_id=TUNED)
    run_id = platform.trigger(TUNED, {"tuning_trials": 4})
    # One storage for the whole test: each open_study makes an engine, and a connection pool a second would exhaust
    # the PostgreSQL server the platform runs on.
    study = open_study(parse_spec(_tuned_spec(), TUNED), run_key(TUNED, run_id).split("/", 1)[1],
                       get_settings(platform.service.env).pools_db_url)
    deadline = time.monotonic() + 600
    while not (done := [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]):
        assert time.monotonic() < deadline, f"no trial finished in 600 s\n{platform.service.log_tails()}"
        time.sleep(1)
    before = {t.number: (t.state, t.value, t.params) for t in done}
    pids = platform.service.state()["pids"]
    for name in ("scheduler", "triggerer"):
        os.killpg(pids[name], signal.SIGKILL)
    gone = time.monotonic() + 30
    while any(alive(pids[name]) for name in ("scheduler", "triggerer")):
        assert time.monotonic() < gone, "the killed scheduler or triggerer is still alive after 30 s"
        time.sleep(0.2)
    log.info("killed the scheduler and the triggerer with %d trial(s) finished", len(before))
    platform.service.up()  # what `kiln up` does: start what is dead, leave the rest
    assert platform.wait(TUNED, run_id) == "success", platform.service.log_tails()
    tis = TaskInstanceApi(platform.api).get_task_instances(TUNED, run_id).task_instances
    trials = sorted((ti for ti in tis if ti.task_id == "trial"), key=lambda ti: ti.map_index)
    assert [ti.map_index for ti in trials] == [0, 1, 2, 3]
    assert {ti.state.value for ti in trials} <= {"success", "skipped"}
    spans = [(ti.start_date, ti.end_date) for ti in trials]
    overlapping = [(a, b) for a in range(4) for b in range(a + 1, 4)
                   if spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]]
    assert overlapping, f"no two trials ran at once: {spans}"
    at_once = max(sum(1 for start, end in spans if start <= t < end) for t, _ in spans)
    assert at_once == 2, f"the spec runs 2 trials at once, {at_once} ran together: {spans}"
    gate = XComApi(platform.api).get_xcom_entry(TUNED, "gate", run_id, "return_value",
                                                deserialize=True).actual_instance.value
    gate = json.loads(gate) if isinstance(gate, str) else gate
    assert gate["passed"] is True, gate

    # The study, read back from the lease store's database with Optuna: one trial per task, numbers never repeated,
    # and what had finished before the kill as it was.
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3], [(t.number, t.state) for t in trials]
    assert sorted(t.user_attrs["kiln_index"] for t in trials) == [0, 1, 2, 3]
    assert {t.number: (t.state, t.value, t.params) for t in trials if t.number in before} == before


#: Epochs and batch size of each trial of the preemption test: long enough (about 45 s here) that the trials still
#: hold the pool when the other pipeline's training asks for devices, after its ingest, validate and features. The
#: length comes from the steps, not from per-epoch costs around them (a faster MLflow once cut a 160-epoch trial
#: from 48 s to 6 s, and the trials ended before the preemption).
TRIAL_EPOCHS, TRIAL_BATCH = 320, 2


@pytest.mark.parametrize("platform", ["embedded"], indirect=True)  # the lease store's SQL runs on both: its tests
def test_a_trial_is_preempted_by_higher_priority_training_and_resumes_from_its_checkpoint(platform: Platform) -> None:
    """Two trials hold every core of the pool; the other pipeline's ``train`` (its team's priority, one above the
    trials') preempts the younger within seconds; the trial checkpoints, waits deferred, and resumes from its
    checkpoint once the devices are free; both runs succeed and the audit history shows no core held twice."""
    from kiln.tasks.pools.inventory import load_inventory
    from kiln.tasks.pools.store import LeaseStore
    from kiln.tasks.settings import get_settings
    from kiln.tasks.storage.artifacts import run_key

    for dag_id in (TUNED, URGENT):
        _wait_for_dag(platform, dag_id=dag_id)
    settings = get_settings(platform.service.env)
    store = LeaseStore(settings.pools_db_url, load_inventory(settings.pools_file))
    pool = store.inventory.pools["local"]
    cores = sum(len(n.cpus) for n in pool.nodes)
    assert cores == 2, f"the test fills the pool with two one-core trials; this pool has {cores} cores"
    try:
        tuned = platform.trigger(TUNED, {"tuning_trials": 2, "epochs": TRIAL_EPOCHS, "batch_size": TRIAL_BATCH})
        deadline = time.monotonic() + 300
        while len([lease for lease in store.leases("local") if lease.owner.dag_id == TUNED
                   and lease.state == "granted"]) < 2:
            assert time.monotonic() < deadline, f"the two trials never held the pool\n{platform.service.log_tails()}"
            time.sleep(1)
        urgent = platform.trigger(URGENT)
        assert platform.wait(URGENT, urgent) == "success", platform.service.log_tails()
        assert platform.wait(TUNED, tuned) == "success", platform.service.log_tails()

        history = store.history("local")
        owners = {e.lease_id: store.lease(e.lease_id).owner for e in history}
        [train] = [i for i, o in owners.items() if (o.dag_id, o.task_id) == (URGENT, "train")]
        preempts = [e for e in history if e.event == "preempt"]
        assert [owners[e.lease_id].task_id for e in preempts] == ["trial"], [(e.event, e.detail) for e in history]
        assert train in preempts[0].detail
        asked = next(e.ts for e in history if e.lease_id == train and e.event == "request")
        granted = next(e.ts for e in history if e.lease_id == train and e.event == "grant")
        log.info("the urgent training was granted %.1f s after it asked (the trial's checkpoint included)",
                 granted - asked)
        assert granted - asked < 30, "the higher-priority training waited for the trial to finish"
        assert replay(history)[1] == set(), "a core was granted while another lease held it"
    finally:
        store.close()

    # The preempted trial went on where its checkpoint left it, as the same trial of the same task try.
    victim = owners[preempts[0].lease_id]
    tis = TaskInstanceApi(platform.api).get_task_instances(TUNED, tuned).task_instances
    trials = [ti for ti in tis if ti.task_id == "trial"]
    assert sorted((ti.state.value, ti.try_number) for ti in trials) == [("success", 1), ("success", 1)]
    assert victim.try_number == 1
    runs = Path(settings.artifact_root) / run_key(TUNED, tuned) / "trials"
    resumed = {int(d.name): json.loads((d / "train" / "train_metrics.json").read_text())["resumed_from_epoch"]
               for d in runs.iterdir()}
    assert sorted(resumed) == [0, 1], resumed  # no third trial: the preempted one kept its number
    assert sum(1 for epoch in resumed.values() if epoch) == 1 and max(e or 0 for e in resumed.values()) >= 1, resumed


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

