"""The spec sections of the data steps: ``source`` (ingest), ``expectations`` (validate), ``cleaning`` (clean) and
``features`` (build_features)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kiln.tasks.spec.base import DAY_S, MAX_COUNT, _Strict


class SqlSourceSpec(_Strict):
    """A query read through an Airflow connection (its id names the database; the credentials stay there)."""

    conn_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,250}$")
    """The Airflow connection of the database (PostgreSQL, MySQL, SQLite, ...: any SQLAlchemy URL it yields)."""
    query: str = Field(min_length=1, max_length=100_000)
    """A ``SELECT`` whose result is the raw table. It may use the run's data interval as the bound parameters
    ``:data_interval_start`` and ``:data_interval_end`` (timestamps with time zone)."""
    watermark_column: str | None = Field(default=None, min_length=1, max_length=200)
    """A column of the query's result that grows with new data (an update time or an id). The watcher
    (``source.watch``) starts a run when its largest value grows."""
    max_rows: int = Field(default=50_000_000, ge=1, le=MAX_COUNT)
    """The most rows the query may return; more stops ``ingest`` naming this field."""


class WatchSpec(_Strict):
    """Start a run when the source has new data (an Airflow AssetWatcher on the triggerer)."""

    interval_s: int = Field(default=60, ge=5, le=DAY_S)
    """Seconds between two looks at the source (an S3 listing, a file's size and time, a watermark query)."""


class SourceSpec(_Strict):
    """Where the raw data comes from: ``uri`` (a file, a folder or prefix of partition files, an S3 object or
    prefix) or ``sql`` (a query through an Airflow connection)."""

    uri: str | None = Field(default=None, min_length=1, max_length=4096)
    """A path (relative to the spec file) or ``file://`` URI inside the data roots (the spec file's folder,
    ``$KILN_HOME/data`` and ``KILN_DATA_ROOTS``, checked after ``..`` and symlinks are resolved), naming one file
    or a folder of partition files; ``s3://bucket/key`` for one object, ``s3://bucket/prefix/`` for every object
    under a prefix (credentials: the S3 store's, the standard AWS chain or ``KILN_S3_CONNECTION_ID``); or
    ``pkg://<package>/<resource>`` for data that a package installed in site-packages ships (read without
    importing the package)."""
    sql: SqlSourceSpec | None = None
    """A query through an Airflow connection, instead of ``uri``."""
    format: Literal["csv", "parquet"] | None = None
    """File format; inferred from the extension (``.csv``, ``.csv.gz``, ``.parquet``) when left out."""
    header: bool = True
    """CSV only: whether the first line names the columns. Without a header, columns are named by
    ``column_names`` or ``col_0``, ``col_1``, ..."""
    column_names: list[str] | None = None
    """CSV only: names for the columns of a header-less file."""
    incremental: Literal["off", "append", "new_only"] = "off"
    """Folders and prefixes of partition files: ``off`` reads every partition each run; ``append`` reads only the
    partitions that are new (or changed) since the last successful run and appends them to that run's snapshot;
    ``new_only`` makes the snapshot of the new partitions alone."""
    watch: WatchSpec | None = None
    """Start a run when the source has new data: new or changed objects under the S3 prefix or files in the
    folder, a changed file, or (``sql``) a larger ``watermark_column``. The DAG's Asset is then the source."""

    @model_validator(mode="after")
    def _one_source(self) -> SourceSpec:
        if (self.uri is None) == (self.sql is None):
            raise ValueError("give exactly one of source.uri (a file, folder or s3:// URI) and source.sql "
                             "({conn_id, query})")
        if self.sql is not None:
            if self.incremental != "off":
                raise ValueError("source.incremental applies to folders and prefixes of partition files; a SQL "
                                 "source selects its new rows with :data_interval_start/:data_interval_end")
            if self.format is not None or not self.header or self.column_names is not None:
                raise ValueError("source.format, source.header and source.column_names apply to files; remove "
                                 "them from a source.sql pipeline")
            if self.watch is not None and self.sql.watermark_column is None:
                raise ValueError("source.watch on a SQL source needs source.sql.watermark_column (a column that "
                                 "grows with new data, such as an update time)")
        elif self.uri is not None and self.uri.startswith("pkg://") and (self.incremental != "off" or self.watch):
            raise ValueError("a pkg:// source is a file inside an installed package: it never changes, so "
                             "source.incremental and source.watch do not apply")
        return self

    @property
    def kind(self) -> Literal["file", "s3", "package", "sql"]:
        """Which reader ingests it."""
        if self.sql is not None:
            return "sql"
        assert self.uri is not None
        if self.uri.startswith("s3://"):
            return "s3"
        if self.uri.startswith("pkg://"):
            return "package"
        return "file"

    def asset_uri(self, pipeline: str) -> str:
        """The URI of the Airflow Asset that stands for this source: its ``uri``, or ``sql://<conn_id>/<pipeline>``."""
        if self.sql is not None:
            return f"sql://{self.sql.conn_id}/{pipeline}"
        assert self.uri is not None
        return self.uri

    def resolved_format(self, name: str | None = None) -> Literal["csv", "parquet"]:
        """The declared format, or the one the extension of ``name`` (default: the URI) implies."""
        if self.format:
            return self.format
        lower = (name or self.uri or "").lower()
        if lower.endswith((".parquet", ".pq")):
            return "parquet"
        return "csv"


class ExpectationSpec(_Strict):
    """One Great Expectations expectation, by its snake_case name, e.g. ``expect_column_values_to_be_between``."""

    type: str = Field(pattern=r"^expect_[a-z0-9_]+$")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ProfileBoundsSpec(_Strict):
    """How far a snapshot's data profile may move from the last accepted snapshot's before ``validate`` stops the
    run, naming the column, the new figure and the previous one."""

    enabled: bool = True
    """Compare each new snapshot with the last accepted one (the first snapshot is only profiled)."""
    max_missing_increase: float = Field(default=0.2, ge=0, le=1)
    """Largest rise of a column's missing share (0.05 -> 0.30 is a rise of 0.25)."""
    max_out_of_range_share: float = Field(default=0.05, ge=0, le=1)
    """Numeric columns: largest share of values outside the previous range, widened by ``range_margin``."""
    range_margin: float = Field(default=0.5, ge=0, le=100)
    """How far past the previous ``[min, max]`` a value may lie, as a multiple of that range's width."""
    max_type_change_share: float = Field(default=0.01, ge=0, le=1)
    """Numeric columns: largest share of present values that are no longer numbers (text in a number column)."""
    max_new_category_share: float = Field(default=0.05, ge=0, le=1)
    """Categorical columns: largest share of rows whose value the previous snapshot never had."""
    min_row_ratio: float = Field(default=0.5, ge=0, le=1)
    """Smallest row count as a share of the previous snapshot's (0.5: a halving stops the run)."""


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
    profile: ProfileBoundsSpec = ProfileBoundsSpec()
    """How far a new snapshot may move from the profile of the last accepted one."""


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


class CacheSpec(_Strict):
    """The step cache: a step whose inputs, settings and code are those of an earlier run's step reuses that
    step's published output instead of recomputing it."""

    enabled: bool = Field(default=True, title="Use the step cache")
    """Reuse the outputs of ``ingest``, ``validate``, ``clean`` and ``build_features`` (and ``train`` with
    ``cache.train``) when their key matches an earlier run's; off: every step recomputes."""
    train: bool = False
    """Cache ``train`` too: the same features, training settings and code reuse the trained model."""
