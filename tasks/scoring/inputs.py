"""The scored input: read with ingest's readers into a staged Parquet snapshot, its schema checked against the
model's signature, and its rows checked with the pipeline's expectation suite, all before any output is written.

The suite is the one ``validate`` checks on training data (the default checks and the declared expectations),
less what only training data can satisfy: the checks on the target (a scored input has no labels) and the row-count
floor (``expectations.min_rows`` is about training), and any expectation on a column the model does not take.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.tasks.scoring.config import VALIDATION_FILE, ScoreConfig, ScoringError
from kiln.tasks.spec import ExpectationSpec, PipelineSpec

if TYPE_CHECKING:
    import pyarrow as pa

    from kiln.tasks.features.transform import FeatureTransform
    from kiln.tasks.steps.ingest import IngestResult

log = logging.getLogger(__name__)

#: Table expectations that a scored input need not meet (they are about the amount of training data).
_TRAINING_ONLY = frozenset({"expect_table_row_count_to_be_between", "expect_table_row_count_to_equal"})
_COLUMN_KWARGS = ("column", "column_A", "column_B", "column_list")


def stage_input(config: ScoreConfig, out_dir: Path) -> IngestResult:
    """Read the input with ingest's readers into ``out_dir/snapshot.parquet`` (and ingest's ``manifest.json``), in
    row groups of ``config.partition_rows`` rows.

    Raises:
        ScoringError: the input is missing, unreadable or empty (ingest's message, naming Param ``input``).
        SourceUnreachableError: its endpoint or database cannot be reached (a retry may succeed).
    """
    from kiln.tasks.sources.errors import IngestError
    from kiln.tasks.spec.sources import data_roots
    from kiln.tasks.steps.ingest import IngestConfig, run_ingest

    # Row groups of the partition size: a partition then decodes its own rows only, not a whole 1M-row group.
    config_in = IngestConfig(source=config.source, data_roots=data_roots(config.spec_dir), pipeline=config.pipeline,
                             row_group_rows=config.partition_rows)
    try:
        result = run_ingest(config_in, out_dir)
    except IngestError as exc:
        raise ScoringError(f"Param 'input' ({config.describe_input()}): {exc}") from None
    log.info("staged the input %s: %d rows, %d columns", config.describe_input(), result.rows, len(result.columns))
    return result


def _kind(t: pa.DataType) -> str:
    """``number``, ``text``, ``bool``, ``null`` or ``other`` for an Arrow type (a dictionary by its values)."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    if pa.types.is_boolean(t):
        return "bool"
    return "null" if pa.types.is_null(t) else "other"


def check_schema(schema: pa.Schema, transform: FeatureTransform, id_column: str | None) -> None:
    """Refuse an input whose columns do not fit the model's signature, naming every column and the fix.

    A numeric input takes numbers (or text holding numbers: a value that is not one is a rejected row); a
    categorical one numbers, text or booleans; the id column numbers or text.

    Raises:
        ScoringError: a missing column or one of a type the model cannot take.
    """
    present = {f.name: _kind(f.type) for f in schema}
    accepted = {**{c.name: ("number", "text", "null") for c in transform.numeric},
                **{c.name: ("number", "text", "bool", "null") for c in transform.categorical}}
    problems = [f"column '{name}' is missing" for name in accepted if name not in present]
    problems += [f"column '{name}' is {schema.field(name).type}, the model takes "
                 f"{'a number' if kinds[0] == 'number' and 'bool' not in kinds else 'text, a number or a boolean'}"
                 for name, kinds in accepted.items() if name in present and present[name] not in kinds]
    if id_column is not None:
        if id_column not in present:
            problems.append(f"the id column '{id_column}' (scoring.id_column) is missing")
        elif present[id_column] not in ("number", "text"):
            problems.append(f"the id column '{id_column}' (scoring.id_column) is {schema.field(id_column).type}; "
                            "ids must be numbers or text")
    if problems:
        raise ScoringError(
            f"Param 'input': the input does not match the model's signature: {'; '.join(problems)}. The model "
            f"takes {', '.join(accepted)} (numeric: {', '.join(c.name for c in transform.numeric) or 'none'}); give "
            "an input with those columns and types (rename or cast them), or score with the version whose "
            "signature it has (Param 'version')")


def scoring_suite(spec: PipelineSpec, dtypes: Any, inputs: list[str]) -> list[ExpectationSpec]:
    """The pipeline's suite as it applies to a scored input (see the module docstring)."""
    from kiln.tasks.features.default_checks import default_suite

    # No numeric shares: the text-among-numbers check then applies to columns of numeric type only.
    suite = default_suite(spec.target, spec.task, dict(spec.columns), spec.expectations, dtypes, {})
    kept = []
    for expectation in suite:
        columns = [c for key in _COLUMN_KWARGS for c in _names(expectation.kwargs.get(key))]
        if expectation.type in _TRAINING_ONLY or any(c not in inputs for c in columns):
            continue
        kept.append(expectation)
    return kept


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def validate_input(spec: PipelineSpec, snapshot: Path, inputs: list[str], out_dir: Path) -> dict[str, Any]:
    """Check the staged ``snapshot`` with the pipeline's suite (:func:`scoring_suite`); write ``validation.json``
    into ``out_dir`` and Great Expectations' Data Docs under ``out_dir/data_docs``.

    Returns:
        The report's summary: ``success``, ``evaluated`` and the failed expectations (none).

    Raises:
        DataValidationError: an expectation failed (the report is written first), naming its column, the
            unexpected count and examples.
    """
    import pyarrow.parquet as pq

    from kiln.tasks.features.batches import empty_frame
    from kiln.tasks.features.expectation_report import expectation_report
    from kiln.tasks.features.expectation_suite import check_expectations, run_suite
    from kiln.tasks.steps.validate import ValidateResult, failed_expectations
    from kiln.tasks.storage.artifacts import write_json

    specs = scoring_suite(spec, empty_frame(pq.ParquetFile(snapshot)), inputs)
    check_expectations(specs, where="suite")
    log.info("validating the scored input against %d expectations of %s's suite", len(specs), spec.name)
    result = run_suite(snapshot, specs, out_dir / "data_docs")
    report = [expectation_report(r) for r in result.results]
    failed = failed_expectations(report)
    file = write_json(out_dir / VALIDATION_FILE, {"success": not failed, "expectations": report})
    outcome = ValidateResult(success=not failed, evaluated=len(report), failed=failed, report_file=str(file))
    outcome.raise_for_failure()
    return {"success": True, "evaluated": len(report), "report_file": str(file)}
