"""The Airflow UI's extra links of a pipeline step: buttons to what the step produced in the run's MLflow run.

Everything a run records for people lives in its MLflow run (the pipeline name is the experiment, the run key a
tag): metrics and the model from ``train`` and ``evaluate``, the data-validation report from ``validate``, the
gate's decision record from ``gate``. Each link is looked up once the step has run (and cached per step, since
Airflow asks link by link); a link whose target does not exist yet is empty.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from airflow.sdk import BaseOperator, BaseOperatorLink

from kiln.tasks.pipeline import keys

if TYPE_CHECKING:
    from airflow.sdk.types import TaskInstanceKey


class _StepLink(BaseOperatorLink):
    """A link of a step to its run's MLflow run; computed once the step finished."""

    name = ""
    #: The artifact of the MLflow run the link opens (``None``: the run's page).
    artifact: str | None = None

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        spec_path = getattr(operator, "spec_path", None)
        return _urls(spec_path, ti_key.run_id, operator.task_id).get(self.name, "") if spec_path else ""


class MlflowRunLink(_StepLink):
    """The run's MLflow run: parameters, metrics, model and every artifact."""

    name = "MLflow run"


class ValidationReportLink(_StepLink):
    """The Great Expectations report of the run's data snapshot."""

    name = "Validation report"
    artifact = f"{keys.MLFLOW_VALIDATION_PATH}/{keys.VALIDATION_FILE}"


class GateDecisionLink(_StepLink):
    """The gate's decision record: both models' metrics, every check, the reason."""

    name = "Gate decision"
    artifact = f"{keys.MLFLOW_GATE_PATH}/{keys.DECISION_FILE}"


#: Every link class, for the provider's registration.
LINKS = (MlflowRunLink, ValidationReportLink, GateDecisionLink)


def link_classes(step: str) -> tuple[type[_StepLink], ...]:
    """The links a step shows. ``ingest`` runs before ``validate`` creates the run's MLflow run, so it has none."""
    if step == keys.INGEST:
        return ()
    extra = {keys.VALIDATE: (ValidationReportLink,), keys.GATE: (GateDecisionLink,)}.get(step, ())
    return (MlflowRunLink, *extra)


def step_links(step: str) -> tuple[BaseOperatorLink, ...]:
    """The extra links of a step's task (DAG files call this while parsing: no heavy imports here)."""
    return tuple(link() for link in link_classes(step))


def mlflow_run_url(ui_url: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """The MLflow UI page of a run, or of one of its artifacts."""
    url = f"{ui_url}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{url}/artifactPath/{artifact}" if artifact else url


@functools.lru_cache(maxsize=4)
def _urls(spec_path: str, airflow_run_id: str, step: str) -> dict[str, str]:
    return step_link_urls(spec_path, airflow_run_id, step)


def step_link_urls(spec_path: str, airflow_run_id: str, step: str) -> dict[str, str]:
    """The URLs of ``step``'s links in one pipeline run; a link whose target does not exist yet is left out.

    Args:
        spec_path: the pipeline's spec file.
        airflow_run_id: the Airflow run id (the run key derives from it).
        step: the task id.
    """
    from mlflow.tracking import MlflowClient

    from kiln.tasks.settings import get_settings
    from kiln.tasks.spec import load_spec
    from kiln.tasks.storage.artifacts import run_key
    from kiln.tasks.tracking.runs import run_of

    settings = get_settings()
    spec = load_spec(spec_path)
    client = MlflowClient(settings.mlflow_tracking_uri)
    exp = client.get_experiment_by_name(spec.name)
    run_id = run_of(client, exp.experiment_id, run_key(spec.name, airflow_run_id)) if exp else None
    if exp is None or run_id is None:
        return {}
    return {link.name: mlflow_run_url(settings.mlflow_ui_url, exp.experiment_id, run_id, link.artifact)
            for link in link_classes(step)}
