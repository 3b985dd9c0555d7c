"""Training checkpoints kept in the artifact store while the job runs, so that a retry on another machine resumes.

The training workers write checkpoints to a local folder (``kiln.tasks.training.checkpoints``: one atomic file per
epoch). Where
that folder is not itself durable (the S3 store's scratch folders live on the machine that ran the task), a
:class:`CheckpointMirror` on the launching side copies each new checkpoint into the store as it appears, and
brings the store's newest one back before the job starts. The workers never talk to the store: the same code runs
under torchrun and in containers, and containers need no store credentials.

What the store holds under the checkpoints key is the newest complete checkpoint, one published version at a time
(the store's atomic publish): a reader sees the old checkpoint or the new one, never a partial file.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from pathlib import Path
from types import TracebackType

from kiln.tasks.storage.artifacts import ArtifactStore, ArtifactStoreError
from kiln.tasks.training.checkpoints import list_checkpoints

log = logging.getLogger(__name__)


class CheckpointMirror:
    """Mirror the newest checkpoint of ``local`` to ``key`` of ``store`` every ``interval_s`` while in use.

    Use as a context manager around the training launch: on entry it restores the store's newest checkpoint into
    ``local`` (when newer than what ``local`` holds) and starts a background publisher; on exit, success or not,
    it publishes the newest checkpoint one last time. A store whose scratch folders are durable
    (``store.durable_scratch``: the local directory store) needs none of this, and the mirror does nothing.

    Args:
        store: the run's artifact store.
        key: where checkpoints are published (``<run>/checkpoints``).
        local: the folder the training job writes its checkpoints to.
        interval_s: how often the background publisher looks for a new checkpoint.
    """

    def __init__(self, store: ArtifactStore, key: str, local: Path, *, interval_s: float = 1.0):
        self.store, self.key, self.local, self.interval_s = store, key, Path(local), interval_s
        self.active = not store.durable_scratch
        self.published_epoch: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one publish at a time: the background thread's or the final one

    def __enter__(self) -> CheckpointMirror:
        if self.active:
            self.restore()
            self._thread = threading.Thread(target=self._run, name="checkpoint-mirror", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.active:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.publish_newest()
        except ArtifactStoreError as err:
            if exc is None:
                raise  # a finished job whose last checkpoint did not reach the store: the step must not pass
            log.warning("could not publish the last checkpoint of %s: %s", self.store.uri(self.key), err)

    def restore(self) -> int | None:
        """Copy the store's newest checkpoint into ``local`` when ``local`` holds nothing as new; returns the
        epoch restored (``None``: nothing to restore)."""
        self.local.mkdir(parents=True, exist_ok=True)
        if not self.store.exists(self.key):
            return None
        stored = list_checkpoints(self.store.path(self.key))  # downloaded and sha256-verified by the store
        if not stored:
            return None
        epoch, source = stored[0]
        self.published_epoch = epoch
        have = list_checkpoints(self.local)
        if have and have[0][0] >= epoch:
            log.info("local checkpoints (epoch %d) are as new as %s (epoch %d)", have[0][0], self.store.uri(self.key),
                     epoch)
            return None
        tmp = self.local / f".{source.name}.restore-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, self.local / source.name)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("restored checkpoint epoch %d from %s", epoch, self.store.uri(self.key))
        return epoch

    def publish_newest(self) -> int | None:
        """Publish the newest local checkpoint if the store does not have it yet; returns its epoch, or ``None``
        when there was nothing new."""
        with self._lock:
            for _ in range(3):  # the trainer may replace the newest file (and delete it) while it is being linked
                have = list_checkpoints(self.local)
                if not have or (self.published_epoch is not None and have[0][0] <= self.published_epoch):
                    return None
                epoch, path = have[0]
                try:
                    with self.store.writer(self.key) as staging:
                        # A hard link is instant and safe: checkpoint files are written once and never changed.
                        _link_or_copy(path, staging / path.name)
                except _Vanished:
                    continue  # nothing was published; look again
                self.published_epoch = epoch
                log.info("checkpoint epoch %d published to %s", epoch, self.store.uri(self.key))
                return epoch
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish_newest()
            except ArtifactStoreError as err:
                # The job goes on; the next round (or the final publish) tries again.
                log.warning("could not publish a checkpoint to %s: %s", self.store.uri(self.key), err)


class _Vanished(Exception):
    """The checkpoint file was deleted (a newer one replaced it) between the listing and the link."""


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        try:
            os.link(source, target)
        except FileNotFoundError:
            raise
        except OSError:
            shutil.copyfile(source, target)  # another filesystem, or one without hard links
    except FileNotFoundError as exc:
        raise _Vanished(str(source)) from exc
