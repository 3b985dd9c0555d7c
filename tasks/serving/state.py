"""The model server's state: the served model set (swapped whole on a reload), its metrics, tokens, capture and
the monitor's figures. :mod:`.app` routes requests over one :class:`ServerState`."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

from kiln.tasks.serving import tokens
from kiln.tasks.serving.capture import Capture, CaptureOptions
from kiln.tasks.serving.deployment import read_deployment
from kiln.tasks.serving.metrics import ServerMetrics, ThrottledLog
from kiln.tasks.serving.models import ModelSet, build_model_set, freeze_heap, load_bundles
from kiln.tasks.serving.monitor_gauges import MonitorFiguresReader
from kiln.tasks.settings import ServeRuntime, get_settings
from kiln.tasks.storage.artifacts import ArtifactStore, UnavailableStore, store_for_root

log = logging.getLogger(__name__)

#: Seconds after a reload before the heap is frozen again (see ``models.freeze_heap``).
REFREEZE_DELAY_S = 1.0


class ServerState:
    """Everything the handlers share: the current model set and how to replace it.

    Args:
        deployment_path: the deployment file ``/admin/reload`` and SIGHUP re-read.
        models: the model set to serve from the start (``None``: ``/ready`` answers 503 until a reload).
        metrics: the metric families (``models`` must have been built with them).
        token: the kiln token: every scope (``/predict`` and ``/admin/*``) on every pipeline.
        tokens_file: the scoped tokens (:mod:`.tokens`; ``None``: only ``token``), re-read when it changes.
        max_batch: the most records per request, and rows per forward pass.
        max_wait_s: how long a batch waits for more requests (0: none).
        seed: seed of the canary routing (``None``: from the OS).
        runtime: what runs the models a reload loads (``models`` must have been loaded with it).
        capture_store: where captured requests and feedback go, and where the monitor's latest figures are read
            from for ``/metrics`` (``None``: the artifact store of the settings).
        capture_options: the capture buffers' bounds and pace.
    """

    def __init__(self, deployment_path: str | Path, models: ModelSet | None, metrics: ServerMetrics, token: str,
                 *, max_batch: int, max_wait_s: float = 0.0, seed: int | None = None,
                 tokens_file: Path | None = None, runtime: ServeRuntime = "auto",
                 capture_store: ArtifactStore | None = None, capture_options: CaptureOptions | None = None):
        self.deployment_path = Path(deployment_path)
        self.runtime = runtime
        self.models = models
        self.metrics = metrics
        self.tokens = tokens.TokenCheck(token, tokens_file)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.random = random.Random(seed).random
        store = capture_store if capture_store is not None else _open_store()
        self.capture = Capture(store, token, metrics, self.random, capture_options)
        self.monitor = MonitorFiguresReader(store)  # the monitor publishes its figures to the same store
        metrics.watch_monitor(self.monitor.current)
        self._reload_lock = asyncio.Lock()
        self.log_canary_failure = ThrottledLog(log, logging.WARNING)
        self.log_champion_failure = ThrottledLog(log, logging.ERROR)
        if models is not None:
            self._publish(models)

    def _publish(self, models: ModelSet) -> None:
        versions = {"champion": models.champion.version}
        if models.canary is not None:
            versions["canary"] = models.canary.version
        self.metrics.set_loaded(versions, models.share)

    async def reload(self) -> ModelSet:
        """Re-read the deployment file, load and warm its new bundles off the event loop, then swap.

        Unchanged versions are reused; the new set starts with fresh statistics. Reloads run one at a time.

        Raises:
            DeploymentError: the deployment file is missing or invalid.
            ModelLoadError: a bundle could not be loaded or failed its warm-up.
        """
        async with self._reload_lock:
            try:
                deployment = read_deployment(self.deployment_path)
                loaded = self.models.bundles if self.models is not None else {}
                bundles = await asyncio.to_thread(load_bundles, deployment, loaded, self.runtime)
                models = build_model_set(deployment, bundles, self.metrics, max_batch=self.max_batch,
                                         max_wait_s=self.max_wait_s)
            except Exception:
                self.metrics.reloads_failed.inc()
                raise
            self.models = models  # the one swap: requests from now on see the new set
            self._publish(models)
            self.metrics.reloads_ok.inc()
            # Once the batches queued on the old set are answered, the new models join the frozen heap.
            asyncio.get_running_loop().call_later(REFREEZE_DELAY_S, freeze_heap)
            log.info("reloaded %s: champion %s, canary %s", self.deployment_path, models.champion.version,
                     f"{models.canary.version} (share {models.share:g})" if models.canary else "none")
            return models


def _open_store() -> ArtifactStore:
    """The settings' artifact store for captures and the monitor's figures; one that cannot be opened (an S3 root
    without the secret the platform withholds from model servers) leaves the server serving, its captures failing
    (counted) and no monitor figures."""
    root = get_settings().artifact_root
    try:
        return store_for_root(root)
    except Exception as exc:  # noqa: BLE001 - a server must serve even when its capture store cannot be opened
        log.error("captures and monitor figures are off: the artifact store %s cannot be opened: %s", root, exc)
        return UnavailableStore(str(root), f"{type(exc).__name__}: {exc}")
