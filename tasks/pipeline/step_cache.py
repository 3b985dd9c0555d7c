"""The step cache: a step whose key (:mod:`kiln.tasks.pipeline.cache_keys`) matches an earlier run's reuses that
run's published output instead of recomputing it.

Every step runs through :func:`run_step` (the Airflow operators and the in-process runner alike). For a cacheable
step it looks up ``<pipeline>/_cache/<step>/<key>``; the entry there (``entry.json``, published atomically through
the store) names the run that produced the output and its result. On a hit the earlier run's folder is published
again under this run's key (hard links in a local store where the filesystem allows, else a copy; an S3 store
fetches it and publishes it again), the step's ``on_hit`` hook does what the step does to its run besides
publishing (``validate``: its MLflow report and the accepted snapshot), and its result is returned, with
``"cache": "hit: <key> from run <run id>"``. An entry whose run's output is gone, or no longer has the files it
recorded, is a miss. On a miss the step runs and the entry is recorded after its output was published (under each
of :func:`~kiln.tasks.pipeline.cache_keys.recorded_keys`). A failed step records nothing.

Every step's result also gets ``"peak_rss_mib"``: the peak resident memory of the process so far.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.cache_keys import CacheKey, read_as_keyed, recorded_keys
from kiln.tasks.pipeline.context import RunContext, StepResult
from kiln.tasks.storage.artifacts import ArtifactNotFoundError, LocalArtifactStore, read_json, write_json

if TYPE_CHECKING:
    from kiln.tasks.pipeline.steps import Step

log = logging.getLogger(__name__)

#: The store folder under a pipeline's prefix that holds the cache entries, ``<pipeline>/_cache/<step>/<key>``.
CACHE_DIR = "_cache"
ENTRY_FILE = "entry.json"
#: The result key of the cache outcome: ``hit: <key> from run <run id>``, ``miss: <key>`` or ``off``.
CACHE_FIELD = "cache"
PEAK_RSS_FIELD = "peak_rss_mib"
#: Steps that keep the first output of a run on a retry (``ingest``'s snapshot): an output already there was not
#: produced under this call's key, so it is neither replaced by a hit nor recorded.
_ONCE_PER_RUN = {keys.INGEST}


def run_step(step: Step, ctx: RunContext, run: Callable[[RunContext], StepResult] | None = None) -> dict[str, Any]:
    """Run ``step`` of the run ``ctx`` through the cache; return its result dict (the task's XCom).

    Args:
        step: the step.
        ctx: the run.
        run: what computes the step on a miss (default ``step.run``; the train operator passes the leased job).

    Returns:
        The step's result dict plus ``cache`` and ``peak_rss_mib``.

    Raises:
        Whatever the step raises; nothing is recorded then.
    """
    return execute_step(step, ctx, run)[0]


def execute_step(step: Step, ctx: RunContext, run: Callable[[RunContext], StepResult] | None = None
                 ) -> tuple[dict[str, Any], StepResult | None]:
    """:func:`run_step`, also returning the step's typed result when it ran (``None`` on a cache hit)."""
    key = step_key(step, ctx)
    result = cached_result(ctx, key, step.on_hit) if key is not None else None
    typed = None
    if result is None:
        typed = (run or step.run)(ctx)
        result = typed.to_dict()
        if key is not None:
            record(ctx, key, result)
            result[CACHE_FIELD] = f"miss: {key.digest}"
        else:
            result[CACHE_FIELD] = "off"
    return with_peak_rss(step.name, result), typed


def reuse(step: Step, ctx: RunContext) -> dict[str, Any] | None:
    """``step``'s result from the cache as :func:`run_step` returns it, its output published under this run; ``None``
    when the step must run (a miss, or not cacheable). The train task asks this before it leases devices."""
    key = step_key(step, ctx)
    hit = cached_result(ctx, key, step.on_hit) if key is not None else None
    return with_peak_rss(step.name, hit) if hit is not None else None


def step_key(step: Step, ctx: RunContext) -> CacheKey | None:
    """The cache key of ``step`` in this run; ``None`` when the cache is off (``cache.enabled: false`` or the
    ``use_cache`` Param), the step is not cacheable in this run, or (``ingest``) this run already took its
    snapshot."""
    if not ctx.spec.cache.enabled:
        log.info("cache off (cache.enabled: false / Param use_cache): %s runs", step.name)
        return None
    if step.name in _ONCE_PER_RUN and ctx.store.exists(ctx.key(step.name)):
        log.info("cache: %s of this run is already published; it is kept as it is", step.name)
        return None
    try:
        return step.cache_key(ctx)
    except ArtifactNotFoundError as exc:  # an input is missing: the step itself fails, naming it
        log.info("cache: no key for %s (%s)", step.name, exc)
        return None


def cached_result(ctx: RunContext, key: CacheKey,
                  on_hit: Callable[[RunContext, dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
    """On a hit, publish the earlier run's output of ``key.step`` under this run, call ``on_hit(ctx, result)`` (the
    step's ``Step.on_hit``) and return its result (with ``cache``, without ``peak_rss_mib``); ``None`` on a miss
    (logged with the key and why).

    Raises:
        Whatever ``on_hit`` raises.
    """
    entry = _entry(ctx, key)
    if entry is None:
        return None
    source = f"{entry['run_key']}/{key.step}"
    if source != ctx.key(key.step):
        republish(ctx, key.step, source)
    result = _rebase(dict(entry["result"]), ctx, source, ctx.key(key.step))
    run_id = str(entry["run_key"]).split("/", 1)[-1]
    if on_hit is not None:
        on_hit(ctx, dict(result))
    log.info("cache hit: %s from run %s", key.digest, run_id)
    result[CACHE_FIELD] = f"hit: {key.digest} from run {run_id}"
    return result


def record(ctx: RunContext, key: CacheKey, result: dict[str, Any]) -> None:
    """Record this run's published output of ``key.step`` as the entry of ``key`` and of any further key it holds
    for (:func:`~kiln.tasks.pipeline.cache_keys.recorded_keys`), each published atomically, unless the output was
    made from other inputs than the key's (:func:`~kiln.tasks.pipeline.cache_keys.read_as_keyed`)."""
    unlike = read_as_keyed(ctx, key)
    if unlike:
        log.warning("cache: the output of %s is not recorded under %s: %s", key.step, key.digest, unlike)
        return
    files = _file_sizes(ctx.input_dir(key.step))
    for each in recorded_keys(ctx, key):
        entry = {"step": each.step, "key": each.digest, "parts": each.parts, "run_key": ctx.run_key,
                 "result": {k: v for k, v in result.items() if k not in (CACHE_FIELD, PEAK_RSS_FIELD)},
                 "files": files, "created_at": datetime.now(UTC).isoformat()}
        with ctx.store.writer(entry_key(ctx, each)) as out:
            write_json(out / ENTRY_FILE, entry)
        log.info("cache entry %s recorded: the output of run %s (%s)", each.digest, ctx.run_key, each.describe())


def entry_key(ctx: RunContext, key: CacheKey) -> str:
    """The store key of ``key``'s entry: ``<pipeline>/_cache/<step>/<key>``."""
    return f"{ctx.spec.name}/{CACHE_DIR}/{key.step}/{key.digest}"


def republish(ctx: RunContext, step: str, source: str) -> None:
    """Publish the folder published under ``source`` as this run's output of ``step``: hard links in a local store
    where the filesystem allows them, else copies (an S3 store: the fetched copy is uploaded again)."""
    src = ctx.store.path(source)
    link = isinstance(ctx.store, LocalArtifactStore)

    def write(out: Path) -> None:
        for path in sorted(src.rglob("*")):
            dest = out / path.relative_to(src)
            if path.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(path, dest, link)

    ctx.publish(step, write)
    log.info("published %s as %s (%s)", ctx.store.uri(source), ctx.store.uri(ctx.key(step)),
             "hard links" if link else "copies")


def with_peak_rss(step: str, result: dict[str, Any]) -> dict[str, Any]:
    """Add ``peak_rss_mib`` (``ru_maxrss`` of this process, KiB on Linux) to ``result`` and log it."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result[PEAK_RSS_FIELD] = round(peak, 1)
    log.info("%s: peak RSS %d MiB", step, peak)
    return result


def _entry(ctx: RunContext, key: CacheKey) -> dict[str, Any] | None:
    """The entry of ``key`` whose output is still published as recorded; ``None`` (logged) otherwise."""
    where = entry_key(ctx, key)
    if not ctx.store.exists(where):
        log.info("cache miss: %s (%s): no earlier run had this key", key.digest, key.describe())
        return None
    entry = read_json(ctx.store.path(where) / ENTRY_FILE)
    source = f"{entry['run_key']}/{key.step}"
    if not ctx.store.exists(source):
        log.info("cache miss: %s: the output of run %s (%s) is gone", key.digest, entry["run_key"],
                 ctx.store.uri(source))
        return None
    found = _file_sizes(ctx.store.path(source))
    if found != entry["files"]:
        changed = sorted(set(found.items()) ^ set(entry["files"].items()))
        log.info("cache miss: %s: the output of run %s no longer holds the files it recorded (%s)", key.digest,
                 entry["run_key"], ", ".join(f"{name} {size} B" for name, size in changed[:5]))
        return None
    return entry


def _file_sizes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _link_or_copy(src: Path, dest: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dest)
            return
        except OSError as exc:  # another filesystem, no hard links there, or the link count is at its limit
            log.debug("hard link %s -> %s failed (%s); copying", src, dest, exc)
    shutil.copy2(src, dest)


def _rebase(result: dict[str, Any], ctx: RunContext, source: str, target: str) -> dict[str, Any]:
    """``result`` with the earlier run's locations of the output (its URI and local path) replaced by this run's."""
    pairs = [(ctx.store.uri(source), ctx.store.uri(target)), (str(ctx.store.path(source)),
                                                              str(ctx.store.path(target)))]
    patterns = [(re.compile(re.escape(old) + r"(?=/|$)"), new) for old, new in pairs if old != new]

    def rebase(value: Any) -> Any:
        if isinstance(value, str):
            for pattern, new in patterns:
                value = pattern.sub(new.replace("\\", "\\\\"), value)
            return value
        if isinstance(value, dict):
            return {k: rebase(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rebase(v) for v in value]
        return value

    return {k: rebase(v) for k, v in result.items()}
