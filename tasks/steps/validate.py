"""The ``validate`` step: check the ingested snapshot against data-quality expectations with Great Expectations.

The suite is the spec's declared expectations plus, unless switched off, defaults inferred from the schema. The
step also profiles the snapshot (:mod:`kiln.tasks.features.profile`) and, unless ``expectations.profile.enabled``
is off, compares it with the profile of the last accepted snapshot (:mod:`kiln.tasks.pipeline.accepted`): a column
whose missing share jumps, whose values leave the seen range or stop being numbers, unseen categories, a collapsed
row count each fail the step like a failed expectation. The step writes a JSON report, the profile and GX Data
Docs (HTML) and returns the result without raising on failures: the caller publishes the report first, then calls
:meth:`ValidateResult.raise_for_failure`, so a failed run still leaves its evidence behind. A snapshot that passes
becomes the pipeline's accepted one.

The step is cached (:func:`kiln.tasks.pipeline.cache_keys.validate_key` says on what); on a hit its effects on the
run still happen through :func:`record_validation`, the one place that logs the report to the run's MLflow run and
publishes the accepted snapshot.

The suite runs one expectation's columns at a time on large snapshots
(:mod:`kiln.tasks.features.expectation_suite`); the profile streams record batches. Neither holds the whole
snapshot in memory.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.errors import DataError
from kiln.tasks.features.default_checks import default_suite
from kiln.tasks.features.expectation_report import expectation_report, jsonable
from kiln.tasks.features.expectation_suite import WHOLE_FRAME_BYTES, check_expectations, run_suite
from kiln.tasks.features.profile import PROFILE_FILE, Breach, DataProfile, compare, profile_parquet
from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.accepted import Accepted, accepted_key, publish_accepted, read_accepted
from kiln.tasks.pipeline.context import RunContext
from kiln.tasks.settings import get_settings
from kiln.tasks.spec import ColumnType, ExpectationSpec, ExpectationsSpec, PipelineSpec, TaskType
from kiln.tasks.storage.artifacts import read_json, write_json

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

_MESSAGE_EXAMPLES = 5


@dataclass(frozen=True)
class ValidateConfig:
    """Settings of the ``validate`` step."""

    target: str
    """The target column; it must exist and never be null."""
    task: TaskType
    """``classification`` or ``regression``: decides the target's inferred type."""
    columns: dict[str, ColumnType]
    """Declared column types (spec field ``columns``); each must exist."""
    expectations: ExpectationsSpec
    """Declared expectations, whether to add the default checks, and their bounds."""
    known_classes: tuple[str, ...] | None = None
    """Classification: the classes the current champion was trained on (a new one fails the default checks);
    ``None`` when there is no champion."""
    compare_rows: bool = True
    """Compare the row count with the accepted snapshot's; off for ``source.incremental: new_only``, whose
    snapshots hold only the new partitions."""
    whole_frame_bytes: int = WHOLE_FRAME_BYTES
    """Below this uncompressed size the snapshot is checked as one frame, above it one expectation's columns at
    a time (:mod:`kiln.tasks.features.expectation_suite`)."""

    @classmethod
    def from_spec(cls, spec: PipelineSpec, known_classes: tuple[str, ...] | None = None) -> ValidateConfig:
        """The config a pipeline spec implies."""
        return cls(target=spec.target, task=spec.task, columns=dict(spec.columns), expectations=spec.expectations,
                   known_classes=known_classes, compare_rows=spec.source.incremental != "new_only")


@dataclass(frozen=True)
class ValidateResult:
    """The outcome of a validation run."""

    success: bool
    evaluated: int
    """Number of expectations evaluated."""
    failed: list[dict[str, Any]] = field(default_factory=list)
    """One dict per failed expectation: type, column, unexpected_count, examples, observed_value, error."""
    report_file: str = ""
    """Path of ``validation.json``."""
    breaches: list[dict[str, Any]] = field(default_factory=list)
    """The profile bounds breached (:class:`kiln.tasks.features.profile.Breach` as dicts)."""
    compared_with: str | None = None
    """The run whose accepted snapshot the profile was compared with; ``None``: not compared."""
    profile_file: str = ""
    """Path of ``profile.json``."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the step's XCom value)."""
        return jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ValidateResult:
        """Inverse of :meth:`to_dict`; keys that are not fields (``cache``, ``peak_rss_mib``) are left out."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def raise_for_failure(self) -> None:
        """Raise :class:`DataValidationError` if any expectation failed or any profile bound was breached.

        Raises:
            DataValidationError: listing each failed expectation (its column, unexpected count and examples) and
                each breach (its column, the new figure, the previous one and the spec field of the bound).
        """
        if not self.success:
            raise DataValidationError(self)


class DataValidationError(DataError):
    """The data failed its expectations or moved past its profile bounds. ``result`` holds the full
    :class:`ValidateResult`."""

    def __init__(self, result: ValidateResult):
        self.result = result
        lines = []
        if result.failed or not result.breaches:
            lines.append(f"data validation failed: {len(result.failed)} of {result.evaluated} expectations failed "
                         f"(report: {result.report_file})")
        for f in result.failed:
            where = f" column '{f['column']}'" if f.get("column") is not None else ""
            detail = []
            if f.get("unexpected_count") is not None:
                detail.append(f"{f['unexpected_count']} unexpected values")
            if f.get("examples"):
                detail.append(f"e.g. {f['examples'][:_MESSAGE_EXAMPLES]}")
            if f.get("observed_value") is not None:
                detail.append(f"observed {f['observed_value']}")
            if f.get("error"):
                detail.append(f"error: {f['error']}")
            hint = f" ({f['hint']})" if f.get("hint") else ""
            lines.append(f"  - {f['type']}{where}: {', '.join(detail) or 'failed'}{hint}")
        if result.breaches:
            lines.append(f"data validation failed: the snapshot moved past {len(result.breaches)} profile bounds "
                         f"from the last accepted snapshot (run {result.compared_with}; report: "
                         f"{result.report_file})")
            lines += [f"  - {b['message']}" for b in result.breaches]
        super().__init__("\n".join(lines))


def build_expectations(config: ValidateConfig, dtypes: pd.DataFrame, profile: DataProfile) -> list[ExpectationSpec]:
    """The suite to check: the default checks (:mod:`kiln.tasks.features.default_checks`), then the declared ones.

    Args:
        config: the step's settings.
        dtypes: a frame with the snapshot's columns and dtypes (its rows are not read).
        profile: the snapshot's profile (which text columns hold mostly numbers).
    """
    share = {name: column.numeric_share for name, column in profile.columns.items()}
    return default_suite(config.target, config.task, config.columns, config.expectations, dtypes, share,
                         config.known_classes)


def run_validate(config: ValidateConfig, snapshot_dir: Path, out_dir: Path,
                 accepted: Accepted | None = None) -> ValidateResult:
    """Validate ``snapshot_dir/snapshot.parquet``; write ``validation.json``, ``profile.json`` and Data Docs into
    ``out_dir``.

    Args:
        config: the step's settings.
        snapshot_dir: the published output of ``ingest``.
        out_dir: an empty folder that the caller publishes once this returns.
        accepted: the pipeline's last accepted snapshot, whose profile the new one is compared with (``None``:
            only profiled).

    Returns:
        The result; failed expectations and breached bounds do not raise here (see
        :meth:`ValidateResult.raise_for_failure`).

    Raises:
        ValueError: an unknown expectation type or invalid kwargs in the spec; a damaged accepted profile.
        FileNotFoundError: the snapshot is missing.
    """
    import pyarrow.parquet as pq

    from kiln.tasks.features.batches import empty_frame

    snapshot = Path(snapshot_dir) / keys.SNAPSHOT_FILE
    if not snapshot.is_file():
        raise FileNotFoundError(f"no snapshot at {snapshot}; run ingest first and pass its output folder")
    check_expectations(config.expectations.declared)  # spec errors first, labelled by their place in the spec
    profile, breaches, compared = _check_profile(config, snapshot, accepted)
    specs = build_expectations(config, empty_frame(pq.ParquetFile(snapshot)), profile)
    check_expectations(specs, where="suite")
    out_dir = Path(out_dir)
    log.info("validating %s (%d rows, %d columns) against %d expectations", snapshot, profile.rows,
             len(profile.columns), len(specs))
    gx_result = run_suite(snapshot, specs, out_dir / keys.DATA_DOCS_DIR, config.whole_frame_bytes)
    result = _report(config, gx_result, profile, breaches, compared, accepted, out_dir, snapshot)
    for b in breaches:
        log.warning("profile breach: %s", b)
    return result


def _report(config: ValidateConfig, gx_result: Any, profile: DataProfile, breaches: list[Breach],
            compared: str | None, accepted: Accepted | None, out_dir: Path, snapshot: Path) -> ValidateResult:
    """Write ``validation.json`` (the expectations' outcomes and the profile's comparison) and ``profile.json``."""
    docs_dir = out_dir / keys.DATA_DOCS_DIR
    profile_file = write_json(out_dir / PROFILE_FILE, profile.to_dict())
    report = [expectation_report(r) for r in gx_result.results]
    success = bool(gx_result.success) and not breaches
    report_file = write_json(out_dir / keys.VALIDATION_FILE, {
        "success": success, "statistics": jsonable(dict(gx_result.statistics)), "expectations": report,
        "profile": {"enabled": config.expectations.profile.enabled, "compared_with": compared,
                    "accepted_at": accepted.accepted_at if accepted else None,
                    "bounds": config.expectations.profile.model_dump(),
                    "breaches": [b.to_dict() for b in breaches], "file": PROFILE_FILE, "profile": profile.to_dict()},
        "snapshot": str(snapshot), "data_docs": str(docs_dir / "index.html")})
    if not (docs_dir / "index.html").is_file():
        raise RuntimeError(f"Great Expectations did not write Data Docs to {docs_dir}/index.html")
    failed = failed_expectations(report)
    log.info("validation %s: %d of %d expectations passed, %d profile bounds breached; report %s",
             "passed" if success else "FAILED", len(report) - len(failed), len(report), len(breaches), report_file)
    for f in failed:
        log.warning("failed %s column %s: unexpected count %s, examples %s, observed %s, error %s", f["type"],
                    f["column"] or "-", f["unexpected_count"], f["examples"], f["observed_value"], f["error"])
    return ValidateResult(success=success, evaluated=len(report), failed=failed, report_file=str(report_file),
                          breaches=[b.to_dict() for b in breaches], compared_with=compared,
                          profile_file=str(profile_file))


def failed_expectations(report: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The failed entries of an expectation report (:func:`expectation_report` dicts) as
    :attr:`ValidateResult.failed` holds them: type, column, unexpected_count, examples, observed_value, error,
    hint."""
    return [{"type": r["type"], "column": r["kwargs"].get("column"), "unexpected_count": r["unexpected_count"],
             "examples": r["partial_unexpected_list"][:_MESSAGE_EXAMPLES], "observed_value": r["observed_value"],
             "error": r["error"], "hint": r["hint"]} for r in report if not r["success"]]


def _check_profile(config: ValidateConfig, snapshot: Path,
                   accepted: Accepted | None) -> tuple[DataProfile, list[Breach], str | None]:
    """The snapshot's profile, its breaches against the accepted profile, and the run it was compared with."""
    bounds = config.expectations.profile
    manifest = snapshot.parent / keys.SNAPSHOT_MANIFEST_FILE
    fraction = float(read_json(manifest).get("sample_fraction", 1.0)) if manifest.is_file() else 1.0
    try:
        previous = DataProfile.from_dict(accepted.profile) if accepted is not None else None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        assert accepted is not None
        raise ValueError(f"the profile of the accepted snapshot (run {accepted.run_key}) cannot be read: {exc}; "
                         f"delete {accepted_key(accepted.run_key.split('/')[0])} in the artifact store and the next "
                         "run that passes validate records a new one") from None
    profile = profile_parquet(snapshot, reference=previous, range_margin=bounds.range_margin,
                              sample_fraction=fraction)
    if previous is None or accepted is None or not bounds.enabled:
        log.info("profile not compared: %s", "expectations.profile.enabled is false" if previous else
                 "no accepted snapshot yet (this one becomes the first if it passes)")
        return profile, [], None
    ignore = [c for c, t in config.columns.items() if t == "ignore"]
    allowed = [config.target] if config.task == "classification" and config.expectations.allow_new_classes else []
    breaches = compare(previous, profile, bounds, ignore=ignore, allow_new_categories=allowed,
                       rows=config.compare_rows)
    log.info("profile compared with the accepted snapshot of %s (accepted %s): %d breaches", accepted.run_key,
             accepted.accepted_at, len(breaches))
    return profile, breaches, accepted.run_key


def validate(ctx: RunContext) -> ValidateResult:
    """Check the snapshot against the spec's expectations and the last accepted snapshot's profile; the report is
    published even when it fails. A snapshot that passes becomes the pipeline's accepted one.

    Raises:
        DataValidationError: an expectation failed or a profile bound was breached (after the report was
            published and logged to MLflow; the accepted snapshot is then left as it was).
    """
    config = ValidateConfig.from_spec(ctx.spec, known_classes=champion_classes(ctx))
    accepted = read_accepted(ctx.store, ctx.spec.name)
    snapshot_dir = ctx.input_dir(keys.INGEST)
    result = ctx.publish(keys.VALIDATE, lambda out: run_validate(config, snapshot_dir, out, accepted))
    return record_validation(ctx, result)


def record_validation(ctx: RunContext, result: ValidateResult) -> ValidateResult:
    """What a validation does to its run once its output is published under the run's key, whether ``validate``
    computed it or the step cache republished an earlier run's: log the published folder to the run's MLflow run;
    on failure mark that run failed and raise; on success publish this run's snapshot (its ingest manifest) and
    the published profile as the pipeline's accepted one.

    Args:
        ctx: the run.
        result: the validation's result.

    Returns:
        ``result`` with the published report and profile paths.

    Raises:
        DataValidationError: the validation failed (the accepted snapshot is left as it was).
    """
    from mlflow.tracking import MlflowClient

    from kiln.tasks.tracking.runs import finish_run

    published = ctx.input_dir(keys.VALIDATE)
    result = replace(result, report_file=str(published / keys.VALIDATION_FILE),
                     profile_file=str(published / PROFILE_FILE))
    # The report goes to the run's MLflow run too, where people open it (the Airflow UI links there).
    tracking_uri = get_settings().mlflow_tracking_uri
    run_id = ctx.mlflow_run()
    MlflowClient(tracking_uri).log_artifacts(run_id, str(published), keys.MLFLOW_VALIDATION_PATH)
    if not result.success:
        finish_run(tracking_uri, run_id, status="FAILED")
    result.raise_for_failure()
    manifest = read_json(ctx.input_dir(keys.INGEST) / keys.SNAPSHOT_MANIFEST_FILE)
    publish_accepted(ctx, manifest, read_json(published / PROFILE_FILE))
    return result


def record_cached_validation(ctx: RunContext, result: dict[str, Any]) -> None:
    """The step cache's hook on a hit of ``validate`` (``Step.on_hit``): :func:`record_validation` of the
    republished result.

    Raises:
        DataValidationError: the recorded result failed (the cache records only passed ones).
    """
    record_validation(ctx, ValidateResult.from_dict(result))


def champion_classes(ctx: RunContext) -> tuple[str, ...] | None:
    """The classes the pipeline's champion was trained on (``None``: regression, ``allow_new_classes``, or no
    champion yet), read from its bundle's feature spec without loading the model."""
    if ctx.spec.task != "classification" or ctx.spec.expectations.allow_new_classes:
        return None
    from kiln.tasks.features.transform import FEATURE_SPEC_FILE, FeatureTransform
    from kiln.tasks.pipeline.endpoint import bundle_cache
    from kiln.tasks.tracking.registry import Registry

    registry = Registry.from_settings()
    champion = registry.champion(ctx.spec.name)
    if champion is None:
        return None
    bundle = registry.fetch_bundle(champion, bundle_cache(ctx.spec.name))
    return FeatureTransform.load(bundle / FEATURE_SPEC_FILE).classes
