"""The spec sections of the data steps: ``source`` (ingest), ``expectations`` (validate), ``cleaning`` (clean) and
``features`` (build_features)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kiln.tasks.spec.base import MAX_COUNT, _Strict


class SourceSpec(_Strict):
    """Where the raw data comes from."""

    uri: str = Field(min_length=1)
    """A path (relative to the spec file) or ``file://`` URI inside the data roots (the spec file's folder,
    ``$KILN_HOME/data`` and ``KILN_DATA_ROOTS``, checked after ``..`` and symlinks are resolved), or
    ``pkg://<package>/<resource>`` for data that a package installed in site-packages ships (read without
    importing the package)."""
    format: Literal["csv", "parquet"] | None = None
    """File format; inferred from the extension (``.csv``, ``.csv.gz``, ``.parquet``) when left out."""
    header: bool = True
    """CSV only: whether the first line names the columns. Without a header, columns are named by
    ``column_names`` or ``col_0``, ``col_1``, ..."""
    column_names: list[str] | None = None
    """CSV only: names for the columns of a header-less file."""

    def resolved_format(self) -> Literal["csv", "parquet"]:
        """The declared format, or the one the URI's extension implies."""
        if self.format:
            return self.format
        lower = self.uri.lower()
        if lower.endswith((".parquet", ".pq")):
            return "parquet"
        return "csv"


class ExpectationSpec(_Strict):
    """One Great Expectations expectation, by its snake_case name, e.g. ``expect_column_values_to_be_between``."""

    type: str = Field(pattern=r"^expect_[a-z0-9_]+$")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ExpectationsSpec(_Strict):
    """Data quality rules checked by the ``validate`` step."""

    infer_defaults: bool = True
    """Add the default checks (README "Data validation"): declared columns and the target exist, the target is
    missing in at most ``max_missing_target_share`` of the rows and never equals its column's name, no column is
    entirely null, numeric columns hold numbers, a column of mostly numbers holds no text, no row repeats the
    header, and a classification target holds no class the champion never saw. ``min_rows`` is checked either
    way."""
    min_rows: int = Field(default=10, ge=1, le=MAX_COUNT)
    """The fewest rows the snapshot may have (counted after ``sample_fraction``); ``clean`` must keep as many."""
    max_missing_target_share: float = Field(default=0.5, ge=0, le=1)
    """Largest share of rows whose target is missing; ``clean`` drops those rows and counts them."""
    allow_new_classes: bool = False
    """Classification: accept target classes that the current champion was never trained on (a new class stops
    the run at ``validate`` otherwise)."""
    declared: list[ExpectationSpec] = Field(default_factory=list)
    """Extra expectations, checked as written."""


class ColumnCleaning(_Strict):
    """How the ``clean`` step treats one column."""

    missing: Literal["drop_row", "mean", "median", "mode", "constant", "keep"] | None = None
    """What to do with missing values; the default is ``median`` for numeric and ``constant`` for categorical."""
    fill_value: str | float | None = None
    """The value used by ``missing: constant``."""
    outliers: Literal["none", "clip_iqr", "drop_iqr"] = "none"
    """Numeric only: clip to, or drop rows outside, ``[Q1 - k*IQR, Q3 + k*IQR]``."""
    iqr_factor: float = Field(default=1.5, gt=0)
    """The ``k`` of the outlier rule."""


class CleaningSpec(_Strict):
    """The ``clean`` step's policy."""

    drop_duplicates: bool = True
    """Drop rows that repeat an earlier row in every column."""
    default_numeric: ColumnCleaning = ColumnCleaning(missing="median")
    """Policy for numeric columns not listed under ``columns``."""
    default_categorical: ColumnCleaning = ColumnCleaning(missing="constant", fill_value="__missing__")
    """Policy for categorical columns not listed under ``columns``."""
    columns: dict[str, ColumnCleaning] = Field(default_factory=dict)
    """Per-column policies; rows with a missing target are always dropped."""
    max_dropped_share: float = Field(default=0.5, ge=0, lt=1)
    """The run stops at ``clean`` when its rules drop more than this share of the snapshot's rows (or leave fewer
    than ``expectations.min_rows``), naming each rule and what it dropped; a rule that drops over a tenth of the
    rows is logged as a warning."""


class FeaturesSpec(_Strict):
    """The ``build_features`` step's settings."""

    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    scaling: Literal["standard", "minmax", "none"] = "standard"
    """How numeric columns are scaled; statistics come from the train split only."""
    max_categories: int = Field(default=50, ge=1, le=1_000_000)
    """Per categorical column, the most frequent values kept; the rest map to the unknown bucket."""

    @model_validator(mode="after")
    def _fractions_leave_train_rows(self) -> FeaturesSpec:
        if self.test_fraction + self.val_fraction >= 0.9:
            raise ValueError("test_fraction + val_fraction must be below 0.9 so that a train split remains")
        return self
