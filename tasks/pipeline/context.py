"""The context of one pipeline run: its spec (with trigger-time Params applied), its key, and its store.

Every step takes a :class:`RunContext`, reads the outputs earlier steps published under the run's key
(:mod:`kiln.tasks.pipeline.keys`) and publishes its own with :meth:`RunContext.publish`: the step writes into a
fresh folder that the store publishes atomically only when it returns, so a failed step leaves the earlier
outputs as they were. Nothing here imports the libraries the steps use: the DAG file imports it while parsing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from kiln.tasks.settings import get_settings
from kiln.tasks.spec import PipelineSpec, load_spec
from kiln.tasks.storage.artifacts import ArtifactStore, run_key, store_for_root

R = TypeVar("R")


class StepResult(Protocol):
    """What a step returns: a typed record of what it did; its dict form is the Airflow task's XCom."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        ...


@dataclass(frozen=True)
class RunContext:
    """Everything a step needs to know about the run it belongs to."""

    spec: PipelineSpec
    run_key: str
    """``<pipeline>/<run id>``: the prefix of every output of the run."""
    store: ArtifactStore
    spec_path: str = ""
    data_interval: tuple[datetime, datetime] | None = None
    """The run's data interval (Airflow's ``data_interval_start``/``_end``): a SQL source's query may bind them."""
    connection_url: Callable[[str], str] | None = None
    """Resolves a connection id to a SQLAlchemy URL (in a DAG: the Airflow connection; the secret never leaves the
    process). ``None``: no connections (a SQL source then fails naming ``source.sql.conn_id``)."""
    trigger_events: tuple[Mapping[str, object], ...] = field(default_factory=tuple)
    """The ``extra`` of each Asset event that started the run (the source watcher records there what changed)."""

    def key(self, step: str) -> str:
        """The artifact key of ``step``'s output in this run."""
        return f"{self.run_key}/{step}"

    def input_dir(self, step: str) -> Path:
        """The published output folder of an earlier step of this run.

        Raises:
            ArtifactNotFoundError: that step has not published yet.
        """
        return self.store.path(self.key(step))

    def publish(self, step: str, write: Callable[[Path], R]) -> R:
        """Run ``write(folder)`` and publish ``folder`` as ``step``'s output once it returns; return its result.

        Nothing is published when ``write`` raises: the step's earlier output (if any) stays as it was.
        """
        with self.store.writer(self.key(step)) as out:
            return write(out)

    def mlflow_run(self) -> str:
        """The MLflow run of this pipeline run (created on first use, reused by later steps and retries)."""
        from kiln.tasks.tracking.runs import ensure_run

        s = get_settings()
        return ensure_run(s.mlflow_tracking_uri, s.mlflow_artifact_root, self.spec.name, self.run_key,
                          tags={"kiln.spec_hash": self.spec.spec_hash(), "kiln.spec_path": self.spec_path})


def default_store() -> ArtifactStore:
    """The store ``KILN_ARTIFACT_ROOT`` names: a local folder (the default) or an ``s3://bucket/prefix``."""
    return store_for_root(get_settings().artifact_root)


def make_context(spec_path: str | Path, run_id: str, params: dict[str, Any] | None = None,
                 store: ArtifactStore | None = None, **run: Any) -> RunContext:
    """Load the spec, apply trigger-time Params, and key the run by ``run_id``; ``run`` sets the other fields of
    :class:`RunContext` (``data_interval``, ``connection_url``, ``trigger_events``).

    Raises:
        SpecError: the spec file or a Param is invalid.
    """
    spec = load_spec(spec_path)
    if params:
        spec = spec.with_overrides(dict(params))
    return RunContext(spec=spec, run_key=run_key(spec.name, run_id), store=store or default_store(),
                      spec_path=str(spec_path), **run)
