"""What each cacheable step's output depends on: the step cache's keys (:mod:`kiln.tasks.pipeline.step_cache`).

A key is the sha256 of named parts: the content hash of the step's inputs, the spec fields the step reads (listed
explicitly per step below) and the version of its code. Correctness comes first: every input that can change a
step's output is a part, so any change misses; a step whose output depends on something that cannot be hashed
here (a SQL query's result, an incremental snapshot's history) is not cacheable and its key function returns
``None``. ``validate``'s verdict also depends on the champion and the last accepted profile: its key holds what the
verdict reads of them (:func:`validate_key`).

The code version of a step is the sha256 of its module's source and of the library modules it uses
(:data:`CODE_MODULES`; a package stands for every ``.py`` file below it), plus the versions of the third-party
libraries that shape its output (:data:`LIBRARIES`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.storage.artifacts import file_sha256, read_json

log = logging.getLogger(__name__)

#: The modules whose source is part of each step's code version: the step module and every library module of
#: kiln it uses (tests/unit/test_step_cache.py checks that the list covers the step's kiln imports).
CODE_MODULES: dict[str, tuple[str, ...]] = {
    keys.INGEST: ("kiln.tasks.steps.ingest", "kiln.tasks.sources", "kiln.tasks.spec.sources",
                  "kiln.tasks.features.batches"),
    # The whole features package: the data steps' libraries move between its modules, and a change to any of
    # them must miss (a needless miss costs a recomputation, a wrong hit a wrong model).
    keys.VALIDATE: ("kiln.tasks.steps.validate", "kiln.tasks.features"),
    keys.CLEAN: ("kiln.tasks.steps.clean", "kiln.tasks.features"),
    keys.BUILD_FEATURES: ("kiln.tasks.steps.build_features", "kiln.tasks.features"),
    keys.TRAIN: ("kiln.tasks.steps.train", "kiln.tasks.pipeline.training_run", "kiln.tasks.training",
                 "kiln.tasks.features"),
}
_DATA_LIBRARIES = ("numpy", "pandas", "pyarrow")
#: Third-party distributions whose version is part of each step's code version.
LIBRARIES: dict[str, tuple[str, ...]] = {
    keys.INGEST: _DATA_LIBRARIES, keys.VALIDATE: (*_DATA_LIBRARIES, "great_expectations"),
    keys.CLEAN: _DATA_LIBRARIES, keys.BUILD_FEATURES: _DATA_LIBRARIES,
    keys.TRAIN: (*_DATA_LIBRARIES, "torch"),
}
#: ``training`` fields that only schedule the job (where and how long it may wait or run, how often it logs); every
#: other training field is part of ``train``'s key, so a field added later is keyed unless it is listed here.
TRAIN_SCHEDULING_FIELDS = {"timeout_s", "log_every_steps", "max_restarts"}
TRAIN_RESOURCE_SCHEDULING_FIELDS = {"pool", "team", "priority", "wait_timeout_s", "ttl_s", "preemptible",
                                    "preempt_grace_s", "placement"}


@dataclass(frozen=True, eq=False)
class CacheKey:
    """The key of one step's output: ``digest`` is the sha256 of ``parts`` (kept for the log and the entry)."""

    step: str
    digest: str
    parts: dict[str, Any]
    """Part name to a JSON-safe value (digests, spec fields, the code version)."""

    @classmethod
    def of(cls, step: str, parts: dict[str, Any]) -> CacheKey:
        """The key of ``step`` made of ``parts`` (JSON-safe)."""
        canonical = json.dumps({"step": step, **parts}, sort_keys=True, separators=(",", ":"), default=str)
        return cls(step=step, digest=hashlib.sha256(canonical.encode()).hexdigest(), parts=parts)

    def describe(self) -> str:
        """The parts for the log: short values as they are, others as the first 12 hex digits of their digest."""
        return ", ".join(f"{name}={_short(value)}" for name, value in sorted(self.parts.items()))


def code_version(step: str) -> str:
    """sha256 of the source of ``step``'s :data:`CODE_MODULES` (a package: every ``.py`` file below it) and the
    versions of its :data:`LIBRARIES`.

    Raises:
        ModuleNotFoundError: a listed module does not exist.
    """
    digest = hashlib.sha256()
    for name in CODE_MODULES[step]:
        for rel, path in _module_files(name):
            digest.update(f"{name}:{rel}\0".encode())
            digest.update(path.read_bytes())
    for dist in LIBRARIES.get(step, ()):
        digest.update(f"{dist}=={_version(dist)}\0".encode())
    return digest.hexdigest()


def folder_digest(folder: Path) -> str:
    """sha256 over every file below ``folder``: its relative path and the sha256 of its bytes, in path order."""
    rows = [[p.relative_to(folder).as_posix(), file_sha256(p)] for p in sorted(folder.rglob("*")) if p.is_file()]
    return _sha(json.dumps(rows, separators=(",", ":")))


def not_cached(ctx: RunContext) -> None:
    """The key of a step that is never cached."""
    return None


def ingest_key(ctx: RunContext) -> CacheKey | None:
    """``ingest``: the source listing's fingerprint (every part's name, size and sha256 or ETag), ``source`` (the
    whole section), ``sample_fraction``, ``training.seed`` (the sample's seed), the trigger events and the code.
    ``None`` for a SQL source (its result is only known by running the query) and for incremental ingest (its
    snapshot depends on the last accepted one)."""
    from kiln.tasks.sources.listing import list_source
    from kiln.tasks.spec.sources import data_roots

    spec = ctx.spec
    if spec.source.sql is not None or spec.source.uri is None:
        log.info("cache: ingest of a SQL source is not cached (its rows are only known by running the query)")
        return None
    if spec.source.incremental != "off":
        log.info("cache: incremental ingest (%s) is not cached (it builds on the last accepted snapshot)",
                 spec.source.incremental)
        return None
    listing = list_source(spec.source, data_roots(Path(ctx.spec_path).parent if ctx.spec_path else None))
    parts: dict[str, Any] = {"listing": listing.fingerprint(), "source": spec.source.model_dump(mode="json"),
                             "sample_fraction": spec.sample_fraction, "training.seed": spec.training.seed,
                             "code": code_version(keys.INGEST)}
    if ctx.trigger_events:
        parts["trigger_events"] = _sha(json.dumps([dict(e) for e in ctx.trigger_events], sort_keys=True,
                                                  default=str))
    return CacheKey.of(keys.INGEST, parts)


def read_as_keyed(ctx: RunContext, key: CacheKey) -> str | None:
    """Why this run's output of ``key.step`` must not be recorded under ``key`` (``None``: it may be): for
    ``ingest``, a source that changed between the key's listing and ingest's own (its manifest's
    ``listing_fingerprint``), so the snapshot holds other data than the key says."""
    if key.step != keys.INGEST:
        return None
    read = read_json(ctx.input_dir(keys.INGEST) / keys.SNAPSHOT_MANIFEST_FILE).get("listing_fingerprint")
    if read != key.parts["listing"]:
        return f"the source changed while it was read (listing {str(read)[:12]}, key's {key.parts['listing'][:12]})"
    return None


def validate_key(ctx: RunContext) -> CacheKey:
    """``validate``: the snapshot's sha256 and its manifest's ``sample_fraction`` (the profile's row counts),
    ``expectations`` (the whole section, profile bounds included), ``target``, ``task``, ``columns``,
    ``source.incremental`` (``new_only`` skips the row count check) and the code, plus what the verdict reads of
    the champion and of the last accepted snapshot:

    * ``new_classes``: the snapshot's target classes the champion was never trained on (:func:`new_classes`). The
      champion enters the suite only as an in-set check of the target against its classes, whose outcome depends
      only on that set (it passes exactly when the set is empty), so a run without a champion and one whose
      champion saw every class share a key: their reports differ by that one passing line (a hit shows the earlier
      run's report), their verdicts cannot.
    * ``accepted``: the content digest of the accepted profile (:meth:`DataProfile.digest`, everything
      :func:`~kiln.tasks.features.profile.compare` reads of it; ``None`` without an accepted snapshot).

    Only a validation that passed is ever recorded (a failed one raises); on a hit, ``Step.on_hit`` still logs the
    report to this run's MLflow run and publishes this run's snapshot as the accepted one.
    """
    from kiln.tasks.steps.validate import champion_classes

    spec = ctx.spec
    manifest = read_json(ctx.input_dir(keys.INGEST) / keys.SNAPSHOT_MANIFEST_FILE)
    snapshot = ctx.input_dir(keys.INGEST) / keys.SNAPSHOT_FILE
    return CacheKey.of(keys.VALIDATE, {
        "snapshot": str(manifest["sha256"]), "sample_fraction": manifest.get("sample_fraction", 1.0),
        "expectations": spec.expectations.model_dump(mode="json"), "target": spec.target, "task": spec.task,
        "columns": dict(spec.columns), "source.incremental": spec.source.incremental,
        "new_classes": new_classes(snapshot, spec.target, champion_classes(ctx)),
        "accepted": _accepted_profile(ctx), "code": code_version(keys.VALIDATE)})


def new_classes(snapshot: Path, target: str, classes: tuple[str, ...] | None) -> list[str] | None:
    """The values of ``target`` in ``snapshot`` that the champion's in-set check
    (:mod:`kiln.tasks.features.default_checks`) counts as unexpected, as sorted text.

    Only the target column is read, by the reader ``validate`` uses (``pandas.read_parquet`` through pyarrow, so
    the same dtypes), and tested as Great Expectations tests it (present values, ``Series.isin`` of the check's
    value set): the list is empty exactly when the check passes.

    Args:
        snapshot: the snapshot file.
        target: the target column.
        classes: the champion's classes; ``None`` when the suite has no such check (no champion, regression,
            ``allow_new_classes``).

    Returns:
        The unexpected values (``[]`` without the check); ``None`` when the snapshot has no ``target`` column
        (the check then fails).
    """
    if classes is None:
        return []
    import pandas as pd
    import pyarrow.parquet as pq

    from kiln.tasks.features.default_checks import as_data_values

    if target not in pq.read_schema(snapshot).names:
        return None
    column = pd.read_parquet(snapshot, columns=[target])[target]
    present = column[column.notna()]
    return sorted({str(v) for v in present[~present.isin(as_data_values(classes))].unique()})


def recorded_keys(ctx: RunContext, key: CacheKey) -> list[CacheKey]:
    """The keys this run's output of ``key.step`` is recorded under: ``key`` and, for a ``validate`` that passed,
    the key of the next run on the same snapshot, whose accepted profile is the one this run just published.

    That second entry holds because a snapshot compared with its own profile never breaches a bound (every share
    is 0 and the row ratio 1, within any bounds the spec allows); the other parts are this run's.
    """
    from kiln.tasks.pipeline.accepted import read_accepted

    if key.step != keys.VALIDATE:
        return [key]
    accepted = read_accepted(ctx.store, ctx.spec.name)
    if accepted is None or accepted.run_key != ctx.run_key or accepted.manifest.get("sha256") != key.parts["snapshot"]:
        return [key]  # another run was accepted since
    after = _accepted_profile(ctx)
    return [key] if after == key.parts["accepted"] else [key, CacheKey.of(key.step, {**key.parts, "accepted": after})]


def clean_key(ctx: RunContext) -> CacheKey:
    """``clean``: the snapshot's sha256, ``cleaning``, ``columns``, ``target``, ``task``,
    ``expectations.min_rows`` and the code."""
    spec = ctx.spec
    return CacheKey.of(keys.CLEAN, {
        "snapshot": _snapshot_sha256(ctx), "cleaning": spec.cleaning.model_dump(mode="json"),
        "columns": dict(spec.columns), "target": spec.target, "task": spec.task,
        "expectations.min_rows": spec.expectations.min_rows, "code": code_version(keys.CLEAN)})


def build_features_key(ctx: RunContext) -> CacheKey:
    """``build_features``: the digest of ``clean``'s published files, ``features``, ``target``, ``task``,
    ``training.seed`` (the split's seed) and the code."""
    spec = ctx.spec
    return CacheKey.of(keys.BUILD_FEATURES, {
        "clean": folder_digest(ctx.input_dir(keys.CLEAN)), "features": spec.features.model_dump(mode="json"),
        "target": spec.target, "task": spec.task, "training.seed": spec.training.seed,
        "code": code_version(keys.BUILD_FEATURES)})


def train_key(ctx: RunContext) -> CacheKey | None:
    """``train`` (only with ``cache.train``): the digest of ``build_features``' published files, ``task``,
    ``model``, ``training`` (less :data:`TRAIN_SCHEDULING_FIELDS` and the pool-scheduling ``resources`` fields),
    ``code`` and the hash of the code folder, the snapshot's sha256 when a user loop reads it, and kiln's code.
    ``None`` when ``cache.train`` is off, or a model factory or entrypoint lives outside ``code.path``."""
    from kiln.tasks.training.user_code import code_hash

    spec = ctx.spec
    if not spec.cache.train:
        return None
    own_code = spec.model.factory is not None or spec.model.type == "custom" or spec.training.entrypoint
    if own_code and not spec.code.path:
        log.info("cache: train is not cached: the model or loop comes from code outside code.path, which kiln "
                 "cannot hash")
        return None
    training = spec.training.model_dump(mode="json", exclude=TRAIN_SCHEDULING_FIELDS)
    training["resources"] = {k: v for k, v in training["resources"].items()
                             if k not in TRAIN_RESOURCE_SCHEDULING_FIELDS}
    parts: dict[str, Any] = {
        "features": folder_digest(ctx.input_dir(keys.BUILD_FEATURES)), "task": spec.task,
        "model": spec.model.model_dump(mode="json"), "training": training,
        "code": spec.code.model_dump(mode="json"),
        "code_hash": code_hash(spec.code.path) if spec.code.path else None, "kiln_code": code_version(keys.TRAIN)}
    if spec.training.entrypoint:
        parts["snapshot"] = _snapshot_sha256(ctx)
    return CacheKey.of(keys.TRAIN, parts)


def _accepted_profile(ctx: RunContext) -> str | None:
    """The content digest of the pipeline's accepted profile; ``None`` without one."""
    from kiln.tasks.features.profile import DataProfile
    from kiln.tasks.pipeline.accepted import read_accepted

    accepted = read_accepted(ctx.store, ctx.spec.name)
    if accepted is None:
        return None
    try:
        return DataProfile.from_dict(accepted.profile).digest()
    except (ValueError, KeyError, TypeError, AttributeError):
        return "unreadable"  # validate fails on it, naming the record to delete; a failure is never recorded


def _snapshot_sha256(ctx: RunContext) -> str:
    return str(read_json(ctx.input_dir(keys.INGEST) / keys.SNAPSHOT_MANIFEST_FILE)["sha256"])


def _module_files(name: str) -> list[tuple[str, Path]]:
    spec = importlib.util.find_spec(name)
    if spec is None or (spec.origin is None and not spec.submodule_search_locations):
        raise ModuleNotFoundError(f"code module {name!r} of the step cache does not exist; fix CODE_MODULES in "
                                  f"{__name__}", name=name)
    if spec.submodule_search_locations:
        return [(p.relative_to(Path(root)).as_posix(), p) for root in spec.submodule_search_locations
                for p in sorted(Path(root).rglob("*.py")) if "__pycache__" not in p.parts]
    assert spec.origin is not None
    return [(Path(spec.origin).name, Path(spec.origin))]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    if len(text) <= 24:
        return text
    return (text if re.fullmatch(r"[0-9a-f]{64}", text) else _sha(text))[:12]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
