"""Unit tests for column type inference (``kiln.tasks.features.column_types``)."""

from __future__ import annotations

import pandas as pd
import pytest

from kiln.tasks.features.column_types import SchemaError, infer_column_types


def frame() -> pd.DataFrame:
    return pd.DataFrame({
        "species": ["a", "b", "a"],
        "mass": [1.0, 2.5, None],
        "year": [2007, 2008, 2009],
        "flag": [True, False, True],
        "island": pd.array(["x", None, "y"], dtype="string"),
        "code": [1, 2, 3],
    })


@pytest.mark.parametrize(("declared", "target", "task", "expected"), [
    ({}, "species", "classification",
     {"species": "categorical", "mass": "numeric", "year": "numeric", "flag": "categorical",
      "island": "categorical", "code": "numeric"}),
    ({"year": "categorical", "code": "ignore"}, "species", "classification",
     {"species": "categorical", "mass": "numeric", "year": "categorical", "flag": "categorical",
      "island": "categorical", "code": "ignore"}),
    ({}, "year", "classification",
     {"species": "categorical", "mass": "numeric", "year": "categorical", "flag": "categorical",
      "island": "categorical", "code": "numeric"}),
    ({}, "mass", "regression",
     {"species": "categorical", "mass": "numeric", "year": "numeric", "flag": "categorical",
      "island": "categorical", "code": "numeric"}),
    ({"code": "numeric", "species": "numeric"}, "code", "classification",
     {"species": "numeric", "mass": "numeric", "year": "numeric", "flag": "categorical",
      "island": "categorical", "code": "numeric"}),
], ids=["inferred-from-dtypes", "declared-wins-and-ignore-kept", "int-target-classification-is-categorical",
        "regression-target-numeric", "declared-target-type-wins"])
def test_infer_column_types(declared, target, task, expected):
    types = infer_column_types(frame(), declared, target, task)
    assert types == expected
    assert list(types) == list(frame().columns)  # column order kept


@pytest.mark.parametrize(("declared", "target", "needle", "suggestion"), [
    ({}, "spceies", "target column", "species"),
    ({"yaer": "categorical"}, "species", "declared column", "year"),
], ids=["missing-target", "missing-declared-column"])
def test_missing_column_is_named_with_closest_match(declared, target, needle, suggestion):
    with pytest.raises(SchemaError) as exc:
        infer_column_types(frame(), declared, target, "classification")
    msg = str(exc.value)
    assert needle in msg
    assert f"Did you mean '{suggestion}'?" in msg
    assert "species, mass, year, flag, island, code" in msg  # the available columns are listed


def test_schema_error_is_value_error():
    assert issubclass(SchemaError, ValueError)


def test_non_strict_skips_absent_columns():
    types = infer_column_types(frame(), {"gone": "numeric", "year": "categorical"}, "nope", "classification",
                               strict=False)
    assert "gone" not in types and "nope" not in types
    assert types["year"] == "categorical"
