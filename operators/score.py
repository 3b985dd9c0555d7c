"""``ScorePartitionOperator``: one partition of a batch-scoring run (:func:`kiln.tasks.scoring.run.score`) on CPU
cores leased from the pipeline's pool, mapped over the ``partition`` task's partitions."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException

from kiln.operators.pools import PooledOperator
from kiln.operators.s3_credentials import use_s3_connection

if TYPE_CHECKING:
    from kiln.tasks.pools.allocation import Allocation, LeaseRequest
    from kiln.tasks.scoring.config import ScoreConfig
    from kiln.tasks.spec import PipelineSpec


@contextmanager
def failing_without_retry() -> Iterator[None]:
    """Fail the task at once, without its retries, on an error a retry cannot fix (a bad Param or input)."""
    from kiln.tasks.errors import DataError
    from kiln.tasks.spec import SpecError

    try:
        yield
    except (DataError, SpecError) as exc:
        raise AirflowFailException(str(exc)) from exc


def scoring_run(spec_path: str, context: Any) -> tuple[PipelineSpec, ScoreConfig]:
    """The pipeline and the scoring config of the running DAG run (its Params), with the S3 connection in use.

    Raises:
        AirflowFailException: the spec or a Param is invalid.
    """
    from kiln.tasks.scoring.config import ScoreConfig

    use_s3_connection()
    with failing_without_retry():
        return ScoreConfig.load(spec_path, dict(context["params"]))


class ScorePartitionOperator(PooledOperator):
    """Score one partition of a scoring run on ``scoring.cpus`` cores leased from ``training.resources.pool``
    (deferring while the request waits); the model runs as many threads as cores were leased.

    Args:
        spec_path: the pipeline spec file.
        part: the partition (``{"index", "start", "stop"}``, from the ``partition`` task).
    """

    template_fields: Sequence[str] = ("spec_path",)
    ui_color = "#e6f4ea"

    def __init__(self, *, spec_path: str, part: dict[str, int], **kwargs: Any) -> None:
        super().__init__(**{"task_id": "score", **kwargs})
        self.spec_path = spec_path
        self.part = part

    def lease_request(self, context: Any) -> tuple[LeaseRequest, float]:
        from kiln.tasks.scoring.run import lease_request

        spec, _ = scoring_run(self.spec_path, context)
        return lease_request(spec), spec.training.resources.wait_timeout_s

    def run_leased(self, context: Any, allocation: Allocation) -> dict[str, Any]:
        from kiln.tasks.pipeline.context import default_store
        from kiln.tasks.scoring.run import score

        _, config = scoring_run(self.spec_path, context)
        threads = max(1, len(allocation.nodes[0].cpus)) if allocation.nodes else None
        with failing_without_retry():
            return score(config, default_store(), context["run_id"], dict(self.part), threads=threads)


def run_scoring_step(spec_path: str, context: Any, step: Any) -> Any:
    """Run one step of a scoring run from a DAG task: ``step(spec, config, store, run_id)`` with this run's
    pipeline, config (from its Params), the artifact store and run id; errors a retry cannot fix fail the task at
    once."""
    from kiln.tasks.pipeline.context import default_store

    spec, config = scoring_run(spec_path, context)
    with failing_without_retry():
        return step(spec, config, default_store(), context["run_id"])
