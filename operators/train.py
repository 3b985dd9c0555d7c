"""``TrainOperator``: runs the ``train`` step through a launcher that ``on_kill`` can stop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException


class TrainOperator(BaseOperator):
    """Train the model of one pipeline run with the launcher its spec names (local torchrun by default).

    The launched job checkpoints every epoch under the run's key, so an Airflow retry of this task resumes from
    the last complete epoch instead of starting over.

    Args:
        spec_path: the pipeline spec file.
    """

    template_fields: Sequence[str] = ("spec_path",)
    ui_color = "#f0e4ff"

    def __init__(self, *, spec_path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec_path = spec_path
        self._launcher: Any = None

    def execute(self, context: Any) -> dict[str, Any]:
        from tasks import pipeline
        from tasks.launch import TrainingFailedError, get_launcher
        from tasks.spec import SpecError

        try:
            ctx = pipeline.make_context(self.spec_path, context["run_id"], dict(context["params"]))
        except SpecError as exc:  # retrying cannot fix a bad spec or Param
            raise AirflowFailException(str(exc)) from exc
        self._launcher = get_launcher(ctx.spec.training.launcher)
        try:
            return pipeline.train(ctx, self._launcher)
        except TrainingFailedError:
            self.log.error("training failed; a retry resumes from the last complete checkpoint")
            raise
        finally:
            self._launcher = None

    def on_kill(self) -> None:
        launcher = self._launcher
        if launcher is not None:
            self.log.info("stopping the training job")
            launcher.terminate()
