"""``SourceChangeTrigger``: the AssetWatcher trigger that starts a pipeline run when its source has new data.

It runs on Airflow's triggerer and polls the source every ``interval_s`` seconds through
:class:`kiln.tasks.sources.watch.SourceWatcher` (an S3 or folder listing, a file's sha256, a SQL watermark query;
the blocking calls run in a worker thread). Each change becomes a ``TriggerEvent`` whose payload Airflow stores as
the Asset event's ``extra["payload"]``: ``{"uri", "root", "parts": [{name, etag, size}, ...]}`` or
``{"uri", "watermark", "previous"}``; the run it starts sees it in ``triggering_asset_events``
(``RunContext.trigger_events``).

Delivery is at least once, never lost: the trigger runs as a one-member shared stream in Airflow's ack mode
(``create_shared_stream_producer``), so the watcher's state (``<pipeline>/_watch/state.json`` in the artifact
store) is saved only after Airflow confirms the Asset event is in its metadata database. A triggerer that stops
before that confirmation emits the change again when it restarts (a new trigger instance from the same kwargs
loads the saved state); one that stops between the confirmation and the save (a moment) repeats the change once.
A change made while no triggerer runs is seen at the first look after the restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent
from airflow.triggers.shared_stream import AdvanceItem, AdvanceOutcome, SharedStreamProducer

if TYPE_CHECKING:
    from kiln.tasks.sources.watch import SourceWatcher

log = logging.getLogger(__name__)


class SourceChangeTrigger(BaseEventTrigger):
    """Fire when ``source`` (a ``SourceSpec`` as plain data) has new data.

    Args:
        pipeline: the pipeline's name (the key of the watcher's state).
        source: the spec's ``source`` section (``SourceSpec.model_dump(mode="json")``); local paths absolute.
        spec_dir: the spec file's folder (a data root for local sources).
        interval_s: seconds between two looks.
    """

    def __init__(self, pipeline: str, source: dict[str, Any], spec_dir: str, interval_s: int) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.source = source
        self.spec_dir = spec_dir
        self.interval_s = interval_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """The classpath and plain kwargs (Airflow stores them; a new instance is built from them on restart)."""
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"pipeline": self.pipeline, "source": self.source, "spec_dir": self.spec_dir,
                 "interval_s": self.interval_s})

    def shared_stream_key(self) -> Hashable:
        """One stream per pipeline: a group of one, for the ack mode's persisted-event confirmation."""
        return ("kiln.source_watch", self.pipeline)

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> SharedStreamProducer:
        """The poll loop, which saves the watcher state once an event is confirmed stored."""
        return SourcePollProducer(**kwargs)

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        """Every change the poll reports is an event of this trigger's Asset."""
        async for payload in shared_stream:
            yield TriggerEvent(payload)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """The standalone loop, used only where Airflow does not run the shared stream (the state is then saved
        once the event is handed over, before Airflow stores it)."""
        producer = SourcePollProducer(**self.serialize()[1])
        async for payload, state in producer.open_stream():
            yield TriggerEvent(payload)
            await producer.advance([AdvanceItem(state, AdvanceOutcome(acked=1, failed=0))])


class SourcePollProducer(SharedStreamProducer):
    """Polls the source (``open_stream``) and commits each change's state (``advance``) once its event is stored."""

    def __init__(self, pipeline: str, source: dict[str, Any], spec_dir: str, interval_s: int) -> None:
        self.pipeline = pipeline
        self.source = source
        self.spec_dir = spec_dir
        self.interval_s = interval_s
        self._watcher: SourceWatcher | None = None

    def _make_watcher(self) -> SourceWatcher:
        from kiln.operators.connections import connection_url
        from kiln.tasks.pipeline.context import default_store
        from kiln.tasks.sources.watch import SourceWatcher
        from kiln.tasks.spec import SourceSpec
        from kiln.tasks.spec.sources import data_roots

        return SourceWatcher(source=SourceSpec.model_validate(self.source), pipeline=self.pipeline,
                             store=default_store(), connection_url=connection_url,
                             roots=data_roots(self.spec_dir))

    def _poll(self) -> Any:
        """One look (in a worker thread): the observation, or None when the source could not be read."""
        from kiln.operators.s3_credentials import use_s3_connection
        from kiln.tasks.errors import DataError

        try:
            if self._watcher is None:
                self._watcher = self._make_watcher()
            if self._watcher.source.kind == "s3":
                use_s3_connection()
            return self._watcher.poll()
        except (DataError, LookupError, ConnectionError) as exc:  # bad input, missing connection, endpoint down
            log.error("source watcher of pipeline %s: %s (looking again in %d s)", self.pipeline, exc,
                      self.interval_s)
        except Exception:  # noqa: BLE001 - a store or network outage must not end the watch: the next look retries
            log.exception("source watcher of pipeline %s failed to look at its source (again in %d s)",
                          self.pipeline, self.interval_s)
        return None

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        """Yield ``(payload, state)`` for each change, forever."""
        from kiln.tasks.sources.watch import payload_json

        while True:
            observation = await asyncio.to_thread(self._poll)
            if observation is not None and observation.payload is not None:
                log.info("source of pipeline %s changed: %s", self.pipeline, payload_json(observation.payload))
                yield observation.payload, observation.state
            await asyncio.sleep(self.interval_s)

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        """Save the state of each change whose event Airflow stored; on a failure, look again from the saved
        state so the change is emitted again."""
        watcher = self._watcher
        if watcher is None:
            return
        for item in batch:
            if item.outcome.is_clean:
                await asyncio.to_thread(watcher.commit, item.broker_payload)
            else:
                log.warning("pipeline %s: an event of its source watcher was not stored (%s); it is emitted again",
                            self.pipeline, item.outcome)
                watcher.rewind()
                return


def source_trigger(pipeline: str, source: Any, spec_path: str | Path) -> SourceChangeTrigger:
    """The trigger of a spec's watched ``source`` (a ``SourceSpec`` with ``watch`` set)."""
    return SourceChangeTrigger(pipeline=pipeline, source=source.model_dump(mode="json", exclude_none=True),
                               spec_dir=str(Path(spec_path).resolve().parent), interval_s=source.watch.interval_s)
