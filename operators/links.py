"""Links from a pipeline run's steps to what they produced, for the Airflow UI's extra-link buttons.

Everything a run records for people lives in its MLflow run (the pipeline name is the experiment, the run key a
tag): metrics and the model from ``train`` and ``evaluate``, the data-validation report from ``validate``, the
gate's decision record from ``gate``. These functions turn a step into URLs of the MLflow UI.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

MLFLOW_RUN = "MLflow run"
VALIDATION_REPORT = "Validation report"
GATE_DECISION = "Gate decision"


def link_names(step: str) -> tuple[str, ...]:
    """The links a step shows (DAG files call this while parsing: no heavy imports here). ``ingest`` runs before
    ``validate`` creates the run's MLflow run, so it has none."""
    if step == "ingest":
        return ()
    extra = {"validate": (VALIDATION_REPORT,), "gate": (GATE_DECISION,)}.get(step, ())
    return (MLFLOW_RUN, *extra)


def mlflow_run_url(ui_url: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """The MLflow UI page of a run, or of one of its artifacts."""
    url = f"{ui_url}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{url}/artifactPath/{artifact}" if artifact else url


def step_links(spec_path: str, airflow_run_id: str, step: str) -> dict[str, str]:
    """The URLs of ``step``'s links in one pipeline run; a link whose target does not exist yet is left out.

    Args:
        spec_path: the pipeline's spec file.
        airflow_run_id: the Airflow run id (the run key derives from it).
        step: the task id.
    """
    from mlflow.tracking import MlflowClient

    from kiln.tasks.settings import get_settings
    from kiln.tasks.spec import load_spec
    from kiln.tasks.steps.gate import DECISION_FILE, MLFLOW_GATE_PATH
    from kiln.tasks.steps.validate import MLFLOW_VALIDATION_PATH, VALIDATION_FILE
    from kiln.tasks.storage.artifacts import run_key
    from kiln.tasks.tracking.runs import run_of

    settings = get_settings()
    spec = load_spec(spec_path)
    client = MlflowClient(settings.mlflow_tracking_uri)
    exp = client.get_experiment_by_name(spec.name)
    run_id = run_of(client, exp.experiment_id, run_key(spec.name, airflow_run_id)) if exp else None
    if exp is None or run_id is None:
        return {}
    # The validate and gate steps log these artifacts to the MLflow run.
    artifacts = {MLFLOW_RUN: None, VALIDATION_REPORT: f"{MLFLOW_VALIDATION_PATH}/{VALIDATION_FILE}",
                 GATE_DECISION: f"{MLFLOW_GATE_PATH}/{DECISION_FILE}"}
    return {name: mlflow_run_url(settings.mlflow_ui_url, exp.experiment_id, run_id, artifacts[name])
            for name in link_names(step)}
