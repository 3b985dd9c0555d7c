"""``PipelineStepOperator``: one step of a pipeline run (``kiln.tasks.pipeline.context.<step>``), with links to its outputs.

Each step's task page in the Airflow UI gets buttons to what the step produced in the run's MLflow run: the run
itself, the data-validation report (``validate``), the gate's decision record (``gate``). The step's return value
(row counts, metrics, the gate decision) is its XCom, shown on the same page.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, BaseOperatorLink
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from kiln.operators.s3_credentials import use_s3_connection

if TYPE_CHECKING:
    from airflow.sdk.types import TaskInstanceKey


class _StepLink(BaseOperatorLink):
    """A link of a step to its run's MLflow run; computed once the step finished (Airflow stores it as XCom)."""

    name = ""

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        spec_path = getattr(operator, "spec_path", None)
        return _links(spec_path, ti_key.run_id, operator.task_id).get(self.name, "") if spec_path else ""


@functools.lru_cache(maxsize=4)
def _links(spec_path: str, run_id: str, step: str) -> dict[str, str]:
    """All links of one step, looked up in MLflow once for the step's buttons (Airflow asks link by link)."""
    from kiln.operators.links import step_links

    return step_links(spec_path, run_id, step)


class MlflowRunLink(_StepLink):
    """The run's MLflow run: parameters, metrics, model and every artifact."""

    name = "MLflow run"


class ValidationReportLink(_StepLink):
    """The Great Expectations report of the run's data snapshot."""

    name = "Validation report"


class GateDecisionLink(_StepLink):
    """The gate's decision record: both models' metrics, every check, the reason."""

    name = "Gate decision"


LINKS: dict[str, type[_StepLink]] = {link.name: link for link in (MlflowRunLink, ValidationReportLink,
                                                                     GateDecisionLink)}


def step_links(step: str) -> tuple[BaseOperatorLink, ...]:
    """The extra links of a step's task (which step shows which: ``kiln.operators.links.link_names``)."""
    from kiln.operators.links import link_names

    return tuple(LINKS[name]() for name in link_names(step))


class PipelineStepOperator(BaseOperator):
    """Run ``kiln.tasks.pipeline.context.<task_id>`` for the current pipeline run and return its result (the XCom).

    A rejected candidate is an outcome, not a failure: the gate's ``GateRejectedError`` in a rollout step becomes
    a skip. Errors that a retry cannot fix (bad data, a bad spec or Param, a candidate that failed in the serving
    runtime) fail the task without retrying.

    Args:
        spec_path: the pipeline spec file.
    """

    template_fields: Sequence[str] = ("spec_path",)
    ui_color = "#e4f0ff"

    def __init__(self, *, spec_path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec_path = spec_path

    @property
    def operator_extra_links(self) -> tuple[BaseOperatorLink, ...]:  # type: ignore[override]
        return step_links(self.task_id)

    def execute(self, context: Any) -> Any:
        from kiln.tasks.pipeline import context as pipeline
        from kiln.tasks.spec import SpecError
        from kiln.tasks.steps.deploy import DeploymentFailedError
        from kiln.tasks.steps.gate import GateRejectedError
        from kiln.tasks.steps.infra_validate import InfraValidationError
        from kiln.tasks.steps.validate import DataValidationError

        use_s3_connection()
        try:
            ctx = pipeline.make_context(self.spec_path, context["run_id"], dict(context["params"]))
            return pipeline.step_function(self.task_id)(ctx)
        except GateRejectedError as exc:
            raise AirflowSkipException(str(exc)) from exc
        except (SpecError, DataValidationError, InfraValidationError, DeploymentFailedError) as exc:
            raise AirflowFailException(str(exc)) from exc
