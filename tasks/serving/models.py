"""The served model set: the loaded, warmed bundles of one deployment and everything a request needs from them.

A :class:`ModelSet` is immutable once built. A reload builds a complete new set (bundles loaded and warmed off the
event loop) and then replaces the server's one reference to it; requests hold the set they started with, and its
batchers finish their queued work on the models they were queued for, so a swap fails no request.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson

from kiln.tasks.bundle.load import Bundle, load_bundle
from kiln.tasks.features.records import records_from_frame
from kiln.tasks.serving.batching import MicroBatcher
from kiln.tasks.serving.deployment import Deployment, ModelRef, utc_now
from kiln.tasks.serving.metrics import ServerMetrics, VariantMetrics, VariantStats
from kiln.tasks.settings import ServeRuntime

log = logging.getLogger(__name__)

Role = Literal["champion", "canary"]
#: A loaded bundle is identified by its version and folder: a reload reuses a bundle whose key is unchanged.
BundleKey = tuple[str, str]
#: Largest difference allowed between the warm-up prediction and the bundle's stored sample predictions (the export
#: checked the bundle against training to 1e-5; this catches a bundle that predicts something else here).
WARM_UP_TOLERANCE = 1e-4


class ModelLoadError(RuntimeError):
    """A bundle of the deployment could not be loaded or failed its warm-up prediction."""


def bundle_key(ref: ModelRef) -> BundleKey:
    """The identity of a loaded bundle: ``(version, bundle folder)``."""
    return (ref.version, ref.bundle)


def deployment_refs(deployment: Deployment) -> list[tuple[Role, ModelRef]]:
    """The variants a deployment serves, champion first."""
    refs: list[tuple[Role, ModelRef]] = [("champion", deployment.champion)]
    if deployment.canary is not None:
        refs.append(("canary", deployment.canary.ref))
    return refs


def warm_up(bundle: Bundle) -> float:
    """Serve the bundle's sample rows once, through the request path, before the bundle takes traffic.

    The first call of an exported program pays one-off costs (allocations, kernel selection) that no user request
    should; it also proves that the bundle predicts here what training predicted for the same rows.

    Returns:
        Seconds the warm-up prediction took.

    Raises:
        ValueError: the predictions differ from the bundle's sample predictions by more than WARM_UP_TOLERANCE.
        RecordError, BundleError, RuntimeError: whatever the bundle raises.
    """
    raw, expected = bundle.sample()
    records = records_from_frame(raw)  # as a client sends them: plain values, missing as null
    start = time.perf_counter()
    y = bundle.predict_features(bundle.transform_records(records))
    bundle.format_predictions(y)
    took = time.perf_counter() - start
    if y.shape != expected.shape:
        raise ValueError(f"the warm-up prediction has shape {list(y.shape)}, the bundle's sample predictions "
                         f"{list(expected.shape)}")
    diff = float(np.max(np.abs(y.astype(np.float64) - expected))) if y.size else 0.0
    if not diff <= WARM_UP_TOLERANCE:  # `not <=` also catches NaN
        raise ValueError(f"the warm-up prediction on the bundle's {len(records)} sample rows differs from its "
                         f"stored sample predictions by {diff:.3g} (allowed {WARM_UP_TOLERANCE:g})")
    return took


def load_bundles(deployment: Deployment, loaded: dict[BundleKey, Bundle], runtime: ServeRuntime = "auto"
                 ) -> dict[BundleKey, Bundle]:
    """Load and warm every bundle ``deployment`` names, reusing those in ``loaded`` (blocking: run off the loop).

    Args:
        deployment: what to serve.
        loaded: bundles already loaded, by :func:`bundle_key` (with the same ``runtime``).
        runtime: what runs the models (``kiln.tasks.bundle.load.load_bundle``); the server's ``--runtime``.

    Returns:
        The bundles of ``deployment`` by key.

    Raises:
        ModelLoadError: a bundle could not be loaded or failed its warm-up; the message names the variant,
            version and folder.
    """
    bundles: dict[BundleKey, Bundle] = {}
    for role, ref in deployment_refs(deployment):
        key = bundle_key(ref)
        if key in bundles:
            continue
        if key in loaded:
            bundles[key] = loaded[key]
            log.info("%s version %s: reusing the loaded bundle %s", role, ref.version, ref.bundle)
            continue
        start = time.perf_counter()
        try:
            bundle = load_bundle(ref.bundle, runtime)
            warm_s = warm_up(bundle)
        except Exception as exc:  # noqa: BLE001 - re-raised with the variant and folder named
            raise ModelLoadError(f"{role} version {ref.version}: cannot serve the bundle {ref.bundle}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        bundles[key] = bundle
        log.info("%s version %s: loaded %s in %.2f s, runtime %s (warm-up prediction %.1f ms)", role, ref.version,
                 ref.bundle, time.perf_counter() - start, bundle.runtime, warm_s * 1000)
    return bundles


class Variant:
    """One served version in one role, with its batcher, bound metrics and statistics."""

    __slots__ = ("role", "version", "bundle", "batcher", "metrics", "stats", "head")

    def __init__(self, role: Role, model: str, ref: ModelRef, bundle: Bundle, metrics: VariantMetrics,
                 max_batch: int, max_wait_s: float):
        self.role = role
        self.version = ref.version
        self.bundle = bundle
        self.metrics = metrics
        self.stats = VariantStats(ref.version)
        self.batcher = MicroBatcher(bundle.predict_features, max_batch, max_wait_s,
                                    on_batch=metrics.batch_rows.observe)
        # Every 200 body starts the same; only the predictions are serialised per request.
        self.head = (b'{"model":' + orjson.dumps(model) + b',"version":' + orjson.dumps(ref.version)
                     + b',"variant":"' + role.encode() + b'","predictions":')


@dataclass(frozen=True)
class ModelSet:
    """What the server serves between two reloads."""

    deployment: Deployment
    champion: Variant
    canary: Variant | None
    share: float
    """Probability that a request goes to the canary (0 without one)."""
    bundles: dict[BundleKey, Bundle]
    """The loaded bundles, handed to the next reload for reuse."""
    since: str
    """ISO time this set started serving (the start of its statistics)."""

    def ready(self) -> dict[str, Any]:
        """The body of ``GET /ready`` and of a successful reload: the versions served and the runtime of each
        (``onnx``, ``torch``, or ``torchscript`` for a format 1 bundle)."""
        d = self.deployment
        canary = {"version": d.canary.version, "share": d.canary.share, "runtime": self.canary.bundle.runtime} \
            if d.canary and self.canary else None
        return {"model": d.model, "champion": {"version": d.champion.version, "runtime": self.champion.bundle.runtime},
                "canary": canary}

    def stats(self) -> dict[str, Any]:
        """The body of ``GET /admin/stats``."""
        return {"champion": self.champion.stats.to_dict(),
                "canary": self.canary.stats.to_dict() if self.canary else None, "since": self.since}


def freeze_heap() -> None:
    """Collect garbage, then hide every object alive now (the loaded models, torch, pandas) from the collector.

    A full collection walks every tracked object (hundreds of thousands once torch and pandas are imported), and
    under load the objects of requests in flight keep triggering them: each would stall every request for tens to
    hundreds of milliseconds on a busy core, most of the p99 at 64 clients. Frozen objects are never walked again.
    Called after start-up and after each reload (unfreezing first, so cycles of a replaced model set are still
    collected).
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def build_model_set(deployment: Deployment, bundles: dict[BundleKey, Bundle], metrics: ServerMetrics, *,
                    max_batch: int, max_wait_s: float = 0.0) -> ModelSet:
    """Assemble a :class:`ModelSet` from bundles loaded by :func:`load_bundles` (cheap; no I/O).

    Raises:
        KeyError: ``bundles`` lacks a bundle the deployment names.
    """
    variants: dict[str, Variant] = {}
    for role, ref in deployment_refs(deployment):
        variants[role] = Variant(role, deployment.model, ref, bundles[bundle_key(ref)],
                                 metrics.bind(role, ref.version), max_batch, max_wait_s)
    canary = variants.get("canary")
    share = deployment.canary.share if deployment.canary else 0.0
    return ModelSet(deployment=deployment, champion=variants["champion"], canary=canary, share=share,
                    bundles=bundles, since=utc_now())
