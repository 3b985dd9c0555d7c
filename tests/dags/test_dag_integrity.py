"""Every DAG imports cleanly, is documented, owned and retried, and an invalid spec is reported, not fatal."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
PIPELINE_STEPS = ["ingest", "validate", "clean", "build_features", "train", "evaluate", "register", "gate",
                  "infra_validate", "deploy", "verify", "promote"]


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors(dagbag) -> None:
    assert dagbag.import_errors == {}


def test_one_dag_per_shipped_spec(dagbag) -> None:
    from kiln.tasks.spec import load_spec

    specs = [load_spec(p) for p in (DAGS / "pipelines").glob("*.yaml")]
    monitors = [f"{s.name}_monitor" for s in specs if s.monitoring is not None]
    assert monitors, "an example spec shows the monitoring section"
    scoring = [f"{s.name}_score" for s in specs]
    assert sorted(dagbag.dag_ids) == sorted([*(s.name for s in specs), *monitors, *scoring, "kiln_champion"])


def test_the_monitor_dag_is_documented_owned_and_retried(dagbag) -> None:
    dag = dagbag.dags["penguins_species_monitor"]
    assert dag.doc_md and "kiln" in dag.tags and "monitoring" in dag.tags
    assert [t.task_id for t in dag.topological_sort()] == ["monitor", "retrain"]
    for t in dag.tasks:
        assert t.owner == "ml-platform" and t.retries >= 1, t.task_id


@pytest.mark.parametrize("dag_id", ["penguins_species", "digits_cnn"], ids=["tabular", "image"])
def test_pipeline_shape_and_hygiene(dagbag, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    assert dag.doc_md and dag.tags and "kiln" in dag.tags
    order, task = [], dag.get_task("ingest")
    while task is not None:  # the pipeline is one chain; walk it
        order.append(task.task_id)
        task = next(iter(task.downstream_list), None)
    assert order == PIPELINE_STEPS
    for t in dag.tasks:
        assert t.owner == "ml-platform", t.task_id
        assert t.retries >= 1, t.task_id
    from kiln.tasks.spec import PARAM_FIELDS

    assert set(dag.params.keys()) == {k for k, path in PARAM_FIELDS.items() if path[0] != "tuning"}  # not tuned


def test_params_reject_out_of_range(dagbag) -> None:
    from airflow.sdk.definitions.param import ParamsDict

    dag = dagbag.dags["penguins_species"]
    params = ParamsDict(dict(dag.params.items()))
    with pytest.raises(Exception, match="epochs"):
        params.update({"epochs": 0})
        params.validate()


#: What a DAG file must not import: the dag-processor parses it every few seconds, and each of these takes from a
#: few hundred milliseconds (pandas, MLflow) to seconds (torch, Great Expectations) to load.
HEAVY_MODULES = {"torch", "numpy", "pandas", "pyarrow", "mlflow", "great_expectations", "optuna", "sklearn", "scipy",
                 "onnxruntime", "matplotlib", "boto3", "docker", "psycopg2"}


def test_dag_files_import_nothing_heavy() -> None:
    """A DAG file is parsed every few seconds by the dag-processor: it imports only Airflow, the spec models and
    what they need (the heavy libraries load inside the tasks). Checked by what is imported, not by a time: a
    busy machine makes any parse slow."""
    code = ("import sys, runpy; before = set(sys.modules); runpy.run_path('dags/kiln_pipelines.py'); "
            "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Airflow's own import is paid once per dag-processor, so it is loaded first and not counted.
    warm = "import airflow.sdk, pendulum, pydantic, yaml;"
    out = subprocess.run([sys.executable, "-c", warm + code], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    imported = set(out.split())
    assert "kiln" in imported  # the file did load the pipelines
    assert imported & HEAVY_MODULES == set()


def test_invalid_spec_is_an_import_error_naming_file_and_field(tmp_path: Path) -> None:
    from airflow.dag_processing.dagbag import DagBag

    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "good.yaml").write_text((DAGS / "pipelines" / "penguins_species.yaml").read_text())
    (pipelines / "broken.yaml").write_text(textwrap.dedent("""\
        name: broken
        source: {uri: data.csv}
        target: y
        task: clasification
        training: {epochs: 0}
    """))
    env = {**os.environ, "KILN_PIPELINES_DIR": str(pipelines)}
    old = os.environ.copy()
    os.environ.update(env)
    try:
        bag = DagBag(dag_folder=str(DAGS))
    finally:
        os.environ.clear()
        os.environ.update(old)
    # the valid spec still becomes its DAGs
    assert sorted(bag.dag_ids) == ["kiln_champion", "penguins_species", "penguins_species_monitor",
                                   "penguins_species_score"]
    assert list(bag.import_errors) == [str(DAGS / "kiln_spec_errors.py")]
    message = next(iter(bag.import_errors.values()))
    assert "broken.yaml" in message
    assert "field 'task'" in message and "clasification" in message and "'classification'" in message
    assert "field 'training.epochs'" in message


def test_champion_dag_params(dagbag) -> None:
    from airflow.sdk.definitions.param import ParamsDict

    dag = dagbag.dags["kiln_champion"]
    assert dag.params["model"] in ("digits_cnn", "penguins_species")
    params = ParamsDict(dict(dag.params.items()))
    with pytest.raises(Exception, match="reason"):  # a move is always explained
        params.update({"reason": ""})
        params.validate()


@pytest.mark.parametrize(("name", "value"), [("seed", 10**30), ("learning_rate", float("nan")),
                                             ("learning_rate", float("inf")), ("sample_fraction", float("nan"))],
                         ids=["seed-1e30", "lr-nan", "lr-inf", "fraction-nan"])
def test_params_reject_unbounded_and_non_finite(dagbag, name: str, value: float) -> None:
    """What a REST trigger or ``airflow dags trigger -c`` (JSON with NaN literals) would pass: refused by the
    Param, naming it, before a run exists (a seed of 10**30 used to crash the task supervisor)."""
    from airflow.sdk.definitions.param import ParamsDict

    params = ParamsDict(dict(dagbag.dags["penguins_species"].params.items()))
    with pytest.raises(Exception, match=name):
        params.update({name: value})
        params.validate()


def test_a_tuned_spec_maps_trials_and_a_dag_airflow_refuses_is_left_out_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from airflow.dag_processing.dagbag import DagBag

    from kiln.operators.train import TrialOperator

    spec = yaml.safe_load((DAGS / "pipelines" / "penguins_species.yaml").read_text())
    spec.update(name="tuned", tuning={"space": {"training.learning_rate": {"type": "log_uniform", "low": 1e-4,
                                                                           "high": 0.1}}, "trials": 6, "parallel": 3})
    (tmp_path / "tuned.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "plain.yaml").write_text((DAGS / "pipelines" / "penguins_species.yaml").read_text())
    monkeypatch.setenv("KILN_PIPELINES_DIR", str(tmp_path))
    dag = DagBag(dag_folder=str(DAGS / "kiln_pipelines.py")).dags["tuned"]
    steps = [t.task_id for t in dag.topological_sort()]
    train = PIPELINE_STEPS.index("train")
    assert steps == [*PIPELINE_STEPS[:train], "study", "trial", *PIPELINE_STEPS[train:]]
    trial = dag.task_dict["trial"]
    assert trial.max_active_tis_per_dagrun == 3 and trial.upstream_task_ids == {"study"}
    assert dag.task_dict["train"].trigger_rule == "all_done"
    assert {"tuning_trials", "tuning_parallel"} <= set(dag.params)
    assert dag.params.get_param("tuning_parallel").schema["maximum"] == 3  # the DAG runs at most 3 at once

    def refused(*args: object, **kwargs: object) -> None:
        raise RuntimeError("refused by Airflow")

    monkeypatch.setattr(TrialOperator, "partial", refused)
    bag = DagBag(dag_folder=str(DAGS / "kiln_pipelines.py"))
    assert "tuned" not in bag.dags and {"penguins_species", "penguins_species_monitor", "tuned_monitor"} <= set(
        bag.dags)
