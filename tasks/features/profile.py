"""The data profile of a snapshot: what good data looked like, per column, in a few kilobytes of JSON.

``validate`` profiles every snapshot and compares it with the last accepted snapshot's profile (:func:`compare`);
the Monitoring of live traffic reuses the same profile. Per column it keeps the kind (``numeric``, ``categorical``
or ``other``), the missing count, the share of present values that read as numbers (a number column that turned
into text shows there), and

* numeric columns: min, max, mean, standard deviation and quantiles;
* categorical columns (text, booleans, dictionaries): the counts of the ``MAX_CATEGORIES`` (1000) most frequent
  values and of all the others, and a few values that are not numbers.

The Parquet file is read in record batches (:mod:`kiln.tasks.features.profile_batches`), so memory stays bounded
by one batch plus, per column, a sample of at most ``RESERVOIR_SIZE`` (10,000) numbers and a counter of at most
10,000 distinct values, whatever the row count. Quantiles come from that sample: a seeded reservoir (uniform over
all values, exact up to 10,000 values, about 1 % rank error above, the same result for the same file). It was
chosen over pyarrow's ``tdigest`` because a t-digest's state cannot be taken out of pyarrow to merge batches, and
quantiles of batches do not merge into quantiles of the whole.

Profiled against a ``reference`` (the accepted profile), it also counts exactly the values outside the reference's
range widened by ``range_margin`` and the values the reference never had; :func:`compare` uses those counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kiln.tasks.features.profile_batches import CategoryStats, NumericStats, OtherStats

if TYPE_CHECKING:
    import pyarrow as pa

    from kiln.tasks.spec.data import ProfileBoundsSpec

log = logging.getLogger(__name__)

FORMAT = 1
#: The file a profile is written to (``validate``'s output and the accepted snapshot record).
PROFILE_FILE = "profile.json"
BATCH_ROWS = 65_536
_SEED = 20_220_522
_SHOWN = 5

Kind = Literal["numeric", "categorical", "other"]


@dataclass(frozen=True)
class ColumnProfile:
    """One column of a :class:`DataProfile`."""

    kind: Kind
    """``numeric`` (integers, floats, decimals), ``categorical`` (text, booleans, dictionaries) or ``other``."""
    type: str
    """The Arrow type in the snapshot, e.g. ``double`` or ``string``."""
    missing: int
    """Null (and NaN) values."""
    numeric_share: float
    """Share of the present values that are numbers (1.0 for a numeric column; for text, those that read as one)."""
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    quantiles: dict[str, float] = field(default_factory=dict)
    """Numeric: quantile (``"0.5"``) to value."""
    categories: dict[str, int] = field(default_factory=dict)
    """Categorical: the most frequent values (cut to 100 characters) and their counts."""
    other: int = 0
    """Categorical: present values not among ``categories``."""
    complete: bool = True
    """Categorical: ``categories`` holds every distinct value (``other`` is 0)."""
    text_examples: list[str] = field(default_factory=list)
    """Categorical: a few present values that are not numbers."""
    out_of_range: int | None = None
    """Profiled against a reference: values outside its widened range (``None``: not counted)."""
    new_categories: int | None = None
    """Profiled against a reference: values it never had (``None``: not counted)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; empty and unset fields are left out."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name in ("quantiles", "categories", "text_examples") and not value):
                continue
            if f.name in ("other", "complete") and self.kind != "categorical":
                continue
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ColumnProfile:
        """Inverse of :meth:`to_dict`."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class DataProfile:
    """The profile of one snapshot."""

    rows: int
    columns: dict[str, ColumnProfile]
    """In the snapshot's column order."""
    sample_fraction: float = 1.0
    """The ``sample_fraction`` the snapshot was taken with (row counts are compared per source row)."""
    reference: dict[str, Any] | None = None
    """What ``out_of_range`` and ``new_categories`` were counted against: ``{"digest", "range_margin"}``."""

    def missing_share(self, column: str) -> float:
        """Share of rows where ``column`` is missing."""
        return self.columns[column].missing / self.rows if self.rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (``profile.json``)."""
        return {"format": FORMAT, "rows": self.rows, "sample_fraction": self.sample_fraction,
                "reference": self.reference, "columns": {c: p.to_dict() for c, p in self.columns.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataProfile:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: not a profile, or one of a later format.
        """
        if not isinstance(d, dict) or "columns" not in d or "rows" not in d:
            raise ValueError("not a data profile: expected a JSON object with 'rows' and 'columns'")
        if d.get("format", FORMAT) > FORMAT:
            raise ValueError(f"data profile format {d['format']} is newer than this kiln reads ({FORMAT})")
        return cls(rows=int(d["rows"]), columns={c: ColumnProfile.from_dict(p) for c, p in d["columns"].items()},
                   sample_fraction=float(d.get("sample_fraction", 1.0)), reference=d.get("reference"))

    def digest(self) -> str:
        """sha256 of the profile's content, without its reference counts (what another profile names it by)."""
        body = {"rows": self.rows, "sample_fraction": self.sample_fraction,
                "columns": {c: {k: v for k, v in p.to_dict().items() if k not in ("out_of_range", "new_categories")}
                            for c, p in self.columns.items()}}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def widened_range(column: ColumnProfile, margin: float) -> tuple[float, float] | None:
    """The range a new value of ``column`` may take: ``[min, max]`` widened by ``margin`` × its width on each side.

    A constant column's width is its value's magnitude (1 for zero), so that a column that held one value still
    tolerates values near it. ``None`` when the column has no numbers.
    """
    if column.min is None or column.max is None:
        return None
    width = column.max - column.min or abs(column.max) or 1.0
    return column.min - margin * width, column.max + margin * width


def profile_parquet(path: str | Path, reference: DataProfile | None = None, range_margin: float = 0.5,
                    sample_fraction: float = 1.0) -> DataProfile:
    """Profile a Parquet file, reading it one record batch at a time.

    Args:
        path: the Parquet file (a snapshot).
        reference: a profile to count against: values outside its range widened by ``range_margin`` (numeric
            columns) and values it never had (categorical columns whose reference holds every value).
        range_margin: see :func:`widened_range`.
        sample_fraction: the sample fraction the file was taken with (recorded in the profile).

    Returns:
        The profile.

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no Parquet file to profile at {path}")
    rows = 0
    # pre_buffer (the default) keeps every column chunk it read until the file is closed: memory grows with rows.
    with pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20) as parquet:
        schema = parquet.schema_arrow
        accumulators = {name: _accumulator(schema.field(name).type,
                                           reference.columns.get(name) if reference else None, range_margin, index)
                        for index, name in enumerate(schema.names)}
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
            rows += batch.num_rows
            for name, acc in accumulators.items():
                acc.update(batch.column(name))
    ref = {"digest": reference.digest(), "range_margin": range_margin} if reference is not None else None
    columns = {name: ColumnProfile.from_dict(acc.finish()) for name, acc in accumulators.items()}
    profile = DataProfile(rows=rows, columns=columns, sample_fraction=sample_fraction, reference=ref)
    log.info("profiled %s: %d rows, %d columns (%d numeric)", path, rows, len(profile.columns),
             sum(p.kind == "numeric" for p in profile.columns.values()))
    return profile


def _accumulator(type_: pa.DataType, reference: ColumnProfile | None, margin: float,
                 index: int) -> NumericStats | CategoryStats | OtherStats:
    import pyarrow as pa

    if pa.types.is_integer(type_) or pa.types.is_floating(type_) or pa.types.is_decimal(type_):
        bounds = widened_range(reference, margin) if reference is not None else None
        return NumericStats(str(type_), bounds, seed=_SEED + index)
    if (pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_boolean(type_)
            or pa.types.is_dictionary(type_)):
        complete = reference is not None and reference.kind == "categorical" and reference.complete
        return CategoryStats(str(type_), reference.categories if complete and reference else None)
    return OtherStats(str(type_))


@dataclass(frozen=True)
class Breach:
    """One way a snapshot's profile moved past its bound from the previous profile."""

    check: Literal["rows", "column_missing", "missing_share", "type_change_share", "out_of_range_share",
                   "new_category_share"]
    column: str | None
    """``None`` for the row count."""
    value: float
    """The new figure (a share, or the row count)."""
    previous: Any
    """The previous figure: a share, a row count, ``[min, max]`` or the previous category values."""
    bound: float
    field: str
    """The spec field that sets the bound (``expectations.profile.max_missing_increase``)."""
    message: str

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the report's ``profile.breaches``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def compare(previous: DataProfile, current: DataProfile, bounds: ProfileBoundsSpec, *, ignore: Collection[str] = (),
            allow_new_categories: Collection[str] = (), rows: bool = True) -> list[Breach]:
    """Every way ``current`` moved past ``bounds`` from ``previous``.

    Out-of-range and new-category shares are exact when ``current`` was profiled against ``previous`` with
    ``bounds.range_margin`` (:func:`profile_parquet`'s ``reference``); otherwise they are estimated from the
    quantiles and the category counts.

    Args:
        previous: the profile of the last accepted snapshot.
        current: the profile of the new one.
        bounds: the spec's ``expectations.profile``.
        ignore: columns left out of every check (declared ``ignore``).
        allow_new_categories: columns whose new values are allowed (a classification target with
            ``expectations.allow_new_classes``).
        rows: compare the row counts (not for snapshots of new partitions only, whose sizes say nothing of a
            collapse).

    Returns:
        The breaches: the row count first, then per column of ``previous``, in its order.
    """
    counted = current.reference == {"digest": previous.digest(), "range_margin": bounds.range_margin}
    out = _rows(previous, current, bounds) if rows else []
    for name, before in previous.columns.items():
        if name in ignore:
            continue
        now = current.columns.get(name)
        if now is None:
            out.append(Breach("column_missing", name, 0.0, previous.missing_share(name), 0.0,
                              "expectations.profile.enabled",
                              f"column '{name}': not in the snapshot, was in the previous one ({before.kind}, "
                              f"missing share {previous.missing_share(name):.2f}) (if it was dropped on purpose, "
                              "run once with expectations.profile.enabled: false to accept the new columns)"))
            continue
        out += _missing(name, previous, current, bounds)
        out += _type_change(name, before, now, current.rows - now.missing, bounds)
        if current.rows - now.missing <= 0:
            continue
        if before.kind == now.kind == "numeric":
            out += _out_of_range(name, before, now, current.rows - now.missing, bounds, counted)
        if before.kind == now.kind == "categorical" and before.complete and name not in allow_new_categories:
            out += _new_categories(name, before, now, current.rows - now.missing, bounds, counted)
    return out


def _rows(previous: DataProfile, current: DataProfile, bounds: ProfileBoundsSpec) -> list[Breach]:
    before = previous.rows / previous.sample_fraction
    ratio = current.rows / current.sample_fraction / before if before else 1.0
    if ratio >= bounds.min_row_ratio:
        return []
    sampled = "" if previous.sample_fraction == current.sample_fraction == 1 else \
        f", per source row at sample_fraction {current.sample_fraction:g} (was {previous.sample_fraction:g})"
    return [Breach("rows", None, current.rows, previous.rows, bounds.min_row_ratio,
                   "expectations.profile.min_row_ratio",
                   f"rows: {current.rows}, was {previous.rows} (ratio {ratio:.2f}{sampled}; bound: >= "
                   f"{bounds.min_row_ratio:.2f}, expectations.profile.min_row_ratio)")]


def _missing(name: str, previous: DataProfile, current: DataProfile, bounds: ProfileBoundsSpec) -> list[Breach]:
    before, now = previous.missing_share(name), current.missing_share(name)
    if now - before <= bounds.max_missing_increase + 1e-12:
        return []
    return [Breach("missing_share", name, now, before, bounds.max_missing_increase,
                   "expectations.profile.max_missing_increase",
                   f"column '{name}': missing share {now:.2f}, was {before:.2f} (bound: rise <= "
                   f"{bounds.max_missing_increase:.2f}, expectations.profile.max_missing_increase)")]


def _type_change(name: str, before: ColumnProfile, now: ColumnProfile, present: int,
                 bounds: ProfileBoundsSpec) -> list[Breach]:
    was_numbers = before.kind == "numeric" or (before.kind == "categorical" and before.categories
                                               and before.numeric_share >= 1 - bounds.max_type_change_share)
    if not was_numbers or present <= 0:
        return []
    share, was = 1 - now.numeric_share, 1 - before.numeric_share
    if share <= bounds.max_type_change_share + 1e-12 or share <= was:
        return []
    examples = f" (e.g. {', '.join(repr(v) for v in now.text_examples[:_SHOWN])})" if now.text_examples else ""
    return [Breach("type_change_share", name, share, was, bounds.max_type_change_share,
                   "expectations.profile.max_type_change_share",
                   f"column '{name}': {share:.2f} of present values are not numbers{examples}, was {was:.2f} "
                   f"(bound: <= {bounds.max_type_change_share:.2f}, expectations.profile.max_type_change_share)")]


def _out_of_range(name: str, before: ColumnProfile, now: ColumnProfile, present: int, bounds: ProfileBoundsSpec,
                  counted: bool) -> list[Breach]:
    widened = widened_range(before, bounds.range_margin)
    if widened is None or now.min is None or now.max is None:
        return []
    lo, hi = widened
    if counted and now.out_of_range is not None:
        share, how = now.out_of_range / present, ""
    else:
        share, how = _share_outside(now, lo, hi), " (estimated from the quantiles)"
    if share <= bounds.max_out_of_range_share + 1e-12:
        return []
    return [Breach("out_of_range_share", name, share, [before.min, before.max], bounds.max_out_of_range_share,
                   "expectations.profile.max_out_of_range_share",
                   f"column '{name}': {share:.2f} of values{how} outside the seen range, now {now.min:.6g} to "
                   f"{now.max:.6g}, was {before.min:.6g} to {before.max:.6g} (allowed: [{lo:.6g}, {hi:.6g}] with "
                   f"range_margin {bounds.range_margin:g}; bound: <= {bounds.max_out_of_range_share:.2f}, "
                   "expectations.profile.max_out_of_range_share)")]


def _share_outside(column: ColumnProfile, lo: float, hi: float) -> float:
    """The share of a column's values below ``lo`` or above ``hi``, read off its quantiles (linear in between)."""
    import numpy as np

    points = sorted((float(q), v) for q, v in column.quantiles.items())
    if not points:
        return 0.0
    qs, values = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    below = float(np.interp(lo, values, qs, left=0.0, right=1.0)) if lo > values[0] else 0.0
    above = 1 - float(np.interp(hi, values, qs, left=0.0, right=1.0)) if hi < values[-1] else 0.0
    return min(1.0, below + above)


def _new_categories(name: str, before: ColumnProfile, now: ColumnProfile, present: int, bounds: ProfileBoundsSpec,
                    counted: bool) -> list[Breach]:
    unseen = [v for v in now.categories if v not in before.categories]
    count = now.new_categories if counted and now.new_categories is not None else \
        sum(now.categories[v] for v in unseen)
    share = count / present
    if share <= bounds.max_new_category_share + 1e-12:
        return []
    known = sorted(before.categories)
    shown = ", ".join(repr(v) for v in known[:_SHOWN]) + (f" and {len(known) - _SHOWN} more" if len(known) > _SHOWN
                                                         else "")
    examples = f" (e.g. {', '.join(repr(v) for v in unseen[:_SHOWN])})" if unseen else ""
    return [Breach("new_category_share", name, share, known, bounds.max_new_category_share,
                   "expectations.profile.max_new_category_share",
                   f"column '{name}': {share:.2f} of present values are new{examples}, was 0.00: the previous "
                   f"snapshot had {len(known)} values, {shown} (bound: <= {bounds.max_new_category_share:.2f}, "
                   "expectations.profile.max_new_category_share)")]
