"""``PipelineStepOperator``: one step of a pipeline run (:data:`kiln.tasks.pipeline.steps.STEPS`), with links to its
outputs.

Each step's task page in the Airflow UI gets buttons to what the step produced in the run's MLflow run: the run
itself, the data-validation report (``validate``), the gate's decision record (``gate``). The step's return value
(row counts, metrics, the gate decision) is its XCom, shown on the same page.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, BaseOperatorLink
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from kiln.operators.links import step_links
from kiln.operators.s3_credentials import use_s3_connection

if TYPE_CHECKING:
    from kiln.tasks.pipeline.context import RunContext
    from kiln.tasks.pipeline.steps import Step


log = logging.getLogger(__name__)

#: The XCom key under which a failed step leaves its error message (the run summary of ``kiln run`` shows it).
ERROR_KEY = "kiln_error"
@contextmanager
def noting_failure(context: Any) -> Iterator[None]:
    """Leave a failing step's error message as the XCom ``kiln_error`` (a skip or a deferral is no failure)."""
    try:
        yield
    except AirflowSkipException:
        raise
    except Exception as exc:
        # The error kiln raised, not the AirflowFailException that only says "do not retry" around it.
        cause = exc.__cause__ if isinstance(exc, AirflowFailException) and exc.__cause__ is not None else exc
        try:
            context["ti"].xcom_push(key=ERROR_KEY, value=f"{type(cause).__name__}: {cause}"[:8000])
        except Exception as push_error:  # noqa: BLE001 (the task's own error must surface, not this one)
            log.warning("could not record the error message as XCom %s: %s", ERROR_KEY, push_error)
        raise


def run_context(spec_path: str, context: Any, overrides: dict[str, Any] | None = None) -> RunContext:
    """The run a task belongs to: the spec with the run's Params applied, keyed by the Airflow run id.

    Raises:
        AirflowFailException: the spec or a Param is invalid (a retry cannot fix it).
    """
    from kiln.operators.connections import connection_url
    from kiln.tasks.pipeline.context import make_context
    from kiln.tasks.spec import SpecError

    use_s3_connection()
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    try:
        return make_context(spec_path, context["run_id"], {**context["params"], **(overrides or {})},
                            data_interval=(start, end) if start is not None and end is not None else None,
                            connection_url=connection_url, trigger_events=trigger_events(context))
    except SpecError as exc:
        raise AirflowFailException(str(exc)) from exc


def trigger_events(context: Any) -> tuple[dict[str, Any], ...]:
    """The ``extra`` of each Asset event that started this run (none for a manual or timed run). An event a watcher
    trigger emitted has Airflow's wrapping ``{"from_trigger": true, "payload": {...}}``: its payload is returned."""
    events = context.get("triggering_asset_events") or {}
    extras = [dict(event.extra or {}) for asset_events in events.values() for event in asset_events]
    return tuple(e["payload"] if e.get("from_trigger") and isinstance(e.get("payload"), dict) else e for e in extras)


class PipelineStepOperator(BaseOperator):
    """Run one step of the current pipeline run and return its result as the task's XCom.

    A rejected candidate is an outcome, not a failure: the gate's ``GateRejectedError`` in a rollout step becomes
    a skip. Errors that a retry cannot fix (bad data, a bad spec or Param, a candidate that failed in the serving
    runtime, a champion alias moved outside kiln, a study's trials that the pool cannot hold at once, a study
    whose trials all failed) fail the task without retrying.

    Args:
        step: the step (one of :data:`kiln.tasks.pipeline.steps.STEPS`); the task id defaults to its name.
        spec_path: the pipeline spec file.
    """

    template_fields: Sequence[str] = ("spec_path",)
    ui_color = "#e4f0ff"

    def __init__(self, *, step: Step, spec_path: str, **kwargs: Any) -> None:
        super().__init__(**{"task_id": step.name, **kwargs})
        self.step = step
        self.spec_path = spec_path

    @property
    def operator_extra_links(self) -> tuple[BaseOperatorLink, ...]:  # type: ignore[override]
        return step_links(self.step.name)

    def execute(self, context: Any) -> Any:
        from kiln.tasks.errors import DataError
        from kiln.tasks.pipeline.endpoint import DeploymentFailedError
        from kiln.tasks.pipeline.gate_decision import GateRejectedError
        from kiln.tasks.pipeline.step_cache import run_step
        from kiln.tasks.pools.allocation import UnsatisfiableRequestError
        from kiln.tasks.steps.infra_validate import InfraValidationError
        from kiln.tasks.tracking.registry import ChampionMismatchError
        from kiln.tasks.tuning.study import TuningError

        with noting_failure(context):
            ctx = run_context(self.spec_path, context)
            try:
                return run_step(self.step, ctx)
            except GateRejectedError as exc:
                raise AirflowSkipException(str(exc)) from exc
            except (DataError, InfraValidationError, DeploymentFailedError, ChampionMismatchError,
                    UnsatisfiableRequestError, TuningError) as exc:
                raise AirflowFailException(str(exc)) from exc
