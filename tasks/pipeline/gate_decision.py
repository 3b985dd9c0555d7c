"""The gate's decision record, as the steps after ``gate`` read it: they act only on a candidate that passed.

``gate`` publishes the record to ``<run>/gate/decision.json`` (and to the candidate's MLflow run); a rejected
candidate is an outcome of the run, not a failure: the later steps raise :class:`GateRejectedError`, which the
DAG turns into *skipped* and the in-process runner records as such.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.storage.artifacts import read_json


@dataclass(frozen=True)
class GateRecord:
    """Why a candidate may, or may not, replace the champion: versions, data, every check and the reason."""

    model: str
    passed: bool
    reason: str
    candidate: dict[str, Any]
    """``version``, ``run_id`` and ``run_key`` of the candidate."""
    champion: dict[str, Any] | None
    """The same for the champion it was compared with; ``None`` for the first model."""
    primary_metric: str
    test_rows: int
    data_hash: str | None
    """sha256 of the ingest snapshot both models were scored on."""
    test_data_hash: str | None
    spec_hash: str
    thresholds: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    """The spec's ``evaluation.gate`` settings the decision used."""
    method: str = "point"
    checks: list[dict[str, Any]] = field(default_factory=list)
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] | None = None
    regated: list[dict[str, Any]] = field(default_factory=list)
    """Earlier decisions this one replaced because the champion moved after they were made (``champion``,
    ``decision``, ``reason``, ``at``), oldest first; empty when the gate's first decision holds."""

    @property
    def decision(self) -> str:
        """``passed`` or ``failed``."""
        return "passed" if self.passed else "failed"

    @property
    def candidate_version(self) -> str:
        """The registered version of the candidate."""
        return str(self.candidate["version"])

    def to_dict(self) -> dict[str, Any]:
        """The record as published in ``decision.json`` (and the ``gate`` task's XCom)."""
        return {"decision": self.decision, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateRecord:
        """Read a record written by :meth:`to_dict`."""
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class GateRejectedError(RuntimeError):
    """The candidate did not pass the gate; ``record`` is the gate's decision record."""

    def __init__(self, record: GateRecord):
        self.record = record
        super().__init__(f"the gate rejected version {record.candidate_version} of {record.model}: {record.reason}")


def read_decision(ctx: RunContext) -> GateRecord:
    """This run's gate decision record.

    Raises:
        ArtifactNotFoundError: the gate step has not run.
    """
    return GateRecord.from_dict(read_json(ctx.input_dir(keys.GATE) / keys.DECISION_FILE))


def require_passed(ctx: RunContext) -> GateRecord:
    """The decision record, if the candidate passed.

    Raises:
        GateRejectedError: it did not.
    """
    record = read_decision(ctx)
    if not record.passed:
        raise GateRejectedError(record)
    return record
