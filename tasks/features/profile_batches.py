"""Per-column statistics gathered one record batch at a time, for :mod:`kiln.tasks.features.profile`.

Each accumulator holds O(1) numbers plus a bounded sample or counter, whatever the row count; ``finish`` returns
the column's profile as a dict (:meth:`kiln.tasks.features.profile.ColumnProfile.from_dict`).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

from kiln.tasks.features.default_checks import NUMBER_PATTERN

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

#: Numbers per column kept to estimate quantiles (a seeded reservoir: see :mod:`kiln.tasks.features.profile`).
RESERVOIR_SIZE = 10_000
#: Category values kept per column (the rest are counted as ``other``).
MAX_CATEGORIES = 1000
#: Distinct values a column's counter holds before its rarest are folded into ``other``.
COUNTER_CAP = 10 * MAX_CATEGORIES
#: Category values are cut to this many characters (a free-text column must not blow up the profile).
MAX_VALUE_CHARS = 100
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
#: Non-number values kept as examples per text column.
EXAMPLES = 5


class OtherStats:
    """A column that is neither numbers nor categories (dates, lists, binary): only its missing count."""

    def __init__(self, type_: str):
        self.type, self.missing = type_, 0

    def update(self, array: pa.Array | pa.ChunkedArray) -> None:
        self.missing += array.null_count

    def finish(self) -> dict[str, Any]:
        return {"kind": "other", "type": self.type, "missing": self.missing, "numeric_share": 0.0}


class NumericStats:
    """Missing count, extremes, moments, a seeded reservoir of values and (against a reference) the values out of
    range."""

    def __init__(self, type_: str, bounds: tuple[float, float] | None, seed: int):
        import numpy as np

        self.type, self.bounds = type_, bounds
        self.rng = np.random.default_rng(seed)
        self.reservoir = np.empty(RESERVOIR_SIZE)
        self.seen = self.missing = self.out_of_range = 0
        self.mean = self.m2 = 0.0  # running mean and sum of squared deviations (Chan et al.: exact, no cancellation)
        self.low, self.high = math.inf, -math.inf

    def update(self, array: pa.Array | pa.ChunkedArray) -> None:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        present = array.drop_null() if array.null_count else array
        if present.type != pa.float64():
            present = pc.cast(present, pa.float64())
        values = present.to_numpy(zero_copy_only=False)
        finite = values[np.isfinite(values)]
        self.missing += len(array) - len(finite)
        if not len(finite):
            return
        self.low, self.high = min(self.low, float(finite.min())), max(self.high, float(finite.max()))
        n, mean = len(finite), float(finite.mean())
        total = self.seen + n
        delta = mean - self.mean
        self.m2 += float(np.square(finite - mean).sum()) + delta * delta * self.seen * n / total
        self.mean += delta * n / total
        if self.bounds is not None:
            self.out_of_range += int(((finite < self.bounds[0]) | (finite > self.bounds[1])).sum())
        self._sample(finite)

    def _sample(self, values: np.ndarray) -> None:
        """Algorithm R, vectorised: the i-th value (from 0) replaces a random slot with probability k/(i+1)."""
        import numpy as np

        fill = min(RESERVOIR_SIZE - self.seen, len(values)) if self.seen < RESERVOIR_SIZE else 0
        self.reservoir[self.seen:self.seen + fill] = values[:fill]
        rest = values[fill:]
        if len(rest):
            index = np.arange(self.seen + fill, self.seen + len(values))
            slots = (self.rng.random(len(rest)) * (index + 1)).astype(np.int64)
            keep = slots < RESERVOIR_SIZE
            for slot, value in zip(slots[keep], rest[keep], strict=True):  # in order: a later value wins a slot
                self.reservoir[slot] = value
        self.seen += len(values)

    def finish(self) -> dict[str, Any]:
        import numpy as np

        n = self.seen
        out_of_range = self.out_of_range if self.bounds is not None else None
        if not n:
            return {"kind": "numeric", "type": self.type, "missing": self.missing, "numeric_share": 1.0,
                    "out_of_range": out_of_range}
        mean, std = self.mean, math.sqrt(self.m2 / n)
        sample = self.reservoir[:min(n, RESERVOIR_SIZE)]
        values = np.quantile(sample, QUANTILES)
        quantiles = {f"{q:g}": float(v) for q, v in zip(QUANTILES, values, strict=True)}
        quantiles.update({"0": self.low, "1": self.high})  # the extremes are exact
        return {"kind": "numeric", "type": self.type, "missing": self.missing, "numeric_share": 1.0, "min": self.low,
                "max": self.high, "mean": mean, "std": std, "quantiles": quantiles, "out_of_range": out_of_range}


class CategoryStats:
    """Value counts (folded into ``other`` past :data:`COUNTER_CAP` distinct values), the values that read as
    numbers and (against a reference's complete category set) the values it never had."""

    def __init__(self, type_: str, known: dict[str, int] | None):
        import pyarrow as pa

        self.type = type_
        self.known = pa.array(list(known), pa.string()) if known is not None else None
        self.counts: Counter[str] = Counter()
        self.missing = self.present = self.numbers = self.folded = self.new = 0
        self.examples: list[str] = []

    def update(self, array: pa.Array | pa.ChunkedArray) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode() if isinstance(array, pa.Array) else pc.cast(array, array.type.value_type)
        self.missing += array.null_count
        # Everything below works on the batch's distinct values, weighted by their counts.
        counted = pc.value_counts(array.drop_null() if array.null_count else array)
        values = pc.utf8_slice_codeunits(pc.cast(counted.field("values"), pa.string()), 0, MAX_VALUE_CHARS)
        counts = counted.field("counts")
        self.present += int(pc.sum(counts).as_py() or 0)
        is_number = pc.match_substring_regex(values, NUMBER_PATTERN)
        self.numbers += int(pc.sum(pc.filter(counts, is_number)).as_py() or 0)
        if len(self.examples) < EXAMPLES:
            for value in pc.filter(values, pc.invert(is_number)).slice(0, EXAMPLES).to_pylist():
                if len(self.examples) < EXAMPLES and value not in self.examples:
                    self.examples.append(value)
        if self.known is not None:
            unseen = pc.invert(pc.is_in(values, value_set=self.known))
            self.new += int(pc.sum(pc.filter(counts, unseen)).as_py() or 0)
        for value, count in zip(values.to_pylist(), counts.to_pylist(), strict=True):
            self.counts[value] += count  # values cut to the same prefix add up
        if len(self.counts) > COUNTER_CAP:
            kept = dict(self.counts.most_common(COUNTER_CAP // 2))
            self.folded += sum(self.counts.values()) - sum(kept.values())
            self.counts = Counter(kept)

    def finish(self) -> dict[str, Any]:
        top = dict(self.counts.most_common(MAX_CATEGORIES))
        other = self.present - sum(top.values())
        return {"kind": "categorical", "type": self.type, "missing": self.missing,
                "numeric_share": self.numbers / self.present if self.present else 0.0, "categories": top,
                "other": other, "complete": other == 0 and not self.folded, "text_examples": self.examples,
                "new_categories": self.new if self.known is not None else None}
