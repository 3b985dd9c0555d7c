"""The retrain cool-down: at most one retrain request per pipeline within ``retrain.cooldown_hours``.

A breach with ``on_breach: retrain`` asks for a retrain only when :func:`should_request` says the last request is
older than the cool-down; the monitor DAG's ``retrain`` task then calls :func:`record_request` and emits the
pipeline's retrain Asset event. Airflow folds the events queued while a run of the pipeline is pending into one
run, so the cool-down bounds the requests and Airflow the queue.

State: ``<pipeline>/_monitor/retrain/state.json`` in the artifact store, published atomically (the store's writer:
a reader sees the old file or the new one, never a part). Its writers are one DAG's tasks with
``max_active_runs=1``, which serialises them; ``record_request`` re-reads the state and refuses to go back in
time, so a late retry of an older run cannot shorten a cool-down started by a newer one.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kiln.tasks.storage.artifacts import ArtifactNotFoundError, ArtifactStore, read_json, write_json

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


def retrain_key(pipeline: str) -> str:
    """The artifact key of ``pipeline``'s retrain state."""
    return f"{pipeline}/_monitor/retrain"


@dataclass(frozen=True)
class RetrainState:
    """The last retrain request of one pipeline."""

    requested_at: str
    """ISO 8601 UTC time of the request."""
    reason: str = ""
    """Why (the monitor's summary)."""
    report: str = ""
    """The artifact key of the monitor report that asked."""

    @property
    def at(self) -> datetime:
        """:attr:`requested_at` as an aware datetime."""
        return datetime.fromisoformat(self.requested_at).astimezone(UTC)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of ``state.json``."""
        return asdict(self)


def load_state(store: ArtifactStore, pipeline: str) -> RetrainState | None:
    """The last retrain request of ``pipeline``, or None (never requested).

    Raises:
        ValueError: ``state.json`` is not a retrain state (a damaged file must not silently reopen the cool-down).
    """
    try:
        folder = store.path(retrain_key(pipeline))
    except ArtifactNotFoundError:
        return None
    data = read_json(folder / STATE_FILE)
    try:
        state = RetrainState(requested_at=str(data["requested_at"]), reason=str(data.get("reason", "")),
                             report=str(data.get("report", "")))
        state.at  # noqa: B018 - parse the time now, so a bad one is reported here
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{store.uri(retrain_key(pipeline))}/{STATE_FILE} is not a retrain state ({exc!r}); "
                         "delete it to reset the cool-down") from None
    return state


def should_request(store: ArtifactStore, pipeline: str, now: datetime, cooldown_h: float) -> bool:
    """Whether a breach at ``now`` may request a retrain: no request yet, or the last one ``cooldown_h`` or more
    hours before ``now``.

    Raises:
        ValueError: a naive ``now``, or a damaged state file (see :func:`load_state`).
    """
    now = _aware(now)
    last = load_state(store, pipeline)
    if last is None:
        return True
    if now - last.at < timedelta(hours=cooldown_h):
        log.info("retrain of %s not requested: the last request (%s) is within the %g h cool-down", pipeline,
                 last.requested_at, cooldown_h)
        return False
    return True


def record_request(store: ArtifactStore, pipeline: str, now: datetime, reason: str = "",
                   report: str = "") -> RetrainState:
    """Record a retrain request at ``now`` (the cool-down starts).

    Returns:
        The state now saved; a saved request newer than ``now`` is kept and returned instead.

    Raises:
        ValueError: a naive ``now``, or a damaged state file.
    """
    now = _aware(now)
    last = load_state(store, pipeline)
    if last is not None and last.at > now:
        log.warning("retrain request of %s at %s not recorded: a newer one (%s) is already", pipeline,
                    now.isoformat(), last.requested_at)
        return last
    state = RetrainState(requested_at=now.isoformat(), reason=reason, report=report)
    with store.writer(retrain_key(pipeline)) as out:
        write_json(out / STATE_FILE, state.to_dict())
    log.info("retrain of %s requested at %s: %s", pipeline, state.requested_at, reason)
    return state


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{moment.isoformat()} has no timezone: pass an aware datetime (UTC)")
    return moment.astimezone(UTC)
