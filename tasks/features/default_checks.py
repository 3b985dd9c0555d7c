"""The checks every spec gets by default (``expectations.infer_defaults``), as Great Expectations expectations.

Each one catches a way real data goes wrong that the shipped examples never showed, and carries a hint (its
``meta``) that the failure message repeats, so the user learns the fix without reading the report:

* the table has at least ``min_rows`` rows (checked even without the other defaults);
* the target and every declared column exist;
* the target is missing in at most ``max_missing_target_share`` of the rows (``clean`` drops and counts them);
* the target never equals its own column name (a header line repeated inside the data);
* no column is entirely missing; numeric columns have a numeric dtype;
* a numeric column, or one whose values are mostly numbers, holds no text (the examples show which values);
* a classification target holds no class that the champion was never trained on (unless allowed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kiln.tasks.features.column_types import infer_column_types
from kiln.tasks.spec import ColumnType, ExpectationSpec, ExpectationsSpec, TaskType

if TYPE_CHECKING:
    import pandas as pd

#: dtype names GX compares a numeric column's dtype against (numpy and pandas nullable dtypes).
NUMERIC_TYPES = [
    *(f"{kind}{bits}" for kind in ("int", "uint") for bits in (8, 16, 32, 64)),
    "float16", "float32", "float64",
    *(f"{kind}{bits}Dtype" for kind in ("Int", "UInt") for bits in (8, 16, 32, 64)),
    "Float32Dtype", "Float64Dtype",
]
#: A column inferred categorical whose non-missing values are numbers at least this often is numeric data with
#: some text in it (a unit, a placeholder, a header line), not a category.
MOSTLY_NUMERIC = 0.8
#: What a number looks like as text (the values a mostly numeric column must all match).
NUMBER_PATTERN = r"^\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*$"


def default_suite(target: str, task: TaskType, columns: dict[str, ColumnType], spec: ExpectationsSpec,
                  dtypes: pd.DataFrame, numeric_share: Mapping[str, float],
                  known_classes: tuple[str, ...] | None = None) -> list[ExpectationSpec]:
    """The suite to check: the defaults (all but ``min_rows`` only with ``infer_defaults``), then the declared ones.

    Args:
        target: the target column.
        task: ``classification`` or ``regression``.
        columns: the spec's declared column types.
        spec: the spec's ``expectations`` section.
        dtypes: a frame with the snapshot's columns and dtypes (its rows, if any, are not read).
        numeric_share: per column, the share of its present values that read as numbers (the profile's
            ``numeric_share``), for the text-among-numbers check.
        known_classes: the classes the champion was trained on; ``None`` without a champion.

    Returns:
        Expectation specs in evaluation order. A declared column or target that is absent gets only its existence
        check, which then fails.
    """
    out = [_check("expect_table_row_count_to_be_between", {"min_value": spec.min_rows},
                  f"the snapshot must have at least expectations.min_rows ({spec.min_rows}) rows, counted after "
                  "sample_fraction; collect more data or lower min_rows")]
    if not spec.infer_defaults:
        return [*out, *spec.declared]
    types = infer_column_types(dtypes, columns, target, task, strict=False)
    for column in dict.fromkeys([*columns, target]):
        out.append(_check("expect_column_to_exist", {"column": column}, "the column is not in the data"))
    if target in types:
        out += _target_checks(target, task, spec, known_classes)
    for column, ctype in types.items():
        if ctype == "ignore":
            continue
        # Proportion of non-null values strictly above 0: fails only when every value is missing.
        out.append(_check("expect_column_proportion_of_non_null_values_to_be_between",
                          {"column": column, "min_value": 0, "strict_min": True},
                          "every value of the column is missing; drop it (columns: {c: ignore}) or fix the source"))
        if ctype == "numeric":
            out.append(_check("expect_column_values_to_be_in_type_list", {"column": column, "type_list": NUMERIC_TYPES},
                              "the column is numeric but its values are not numbers"))
        if _text_among_numbers(dtypes[column], numeric_share.get(column, 0.0), ctype, declared=column in columns):
            out.append(_check("expect_column_values_to_match_regex", {"column": column, "regex": NUMBER_PATTERN},
                              "a column of numbers with some text in it; fix those values in the source, or "
                              f"declare it categorical (columns: {{{column}: categorical}}) if the text belongs"))
    return [*out, *spec.declared]


def _target_checks(target: str, task: TaskType, spec: ExpectationsSpec,
                   known_classes: tuple[str, ...] | None) -> list[ExpectationSpec]:
    share = spec.max_missing_target_share
    out = [_check("expect_column_values_to_not_be_in_set", {"column": target, "value_set": [target]},
                  "a value equal to the column's name: a header line repeated inside the data")]
    if share < 1:
        out.append(_check("expect_column_values_to_not_be_null", {"column": target, "mostly": 1 - share},
                          f"the target is missing in more than expectations.max_missing_target_share ({share:g}) "
                          "of the rows"))
    if task == "classification" and known_classes is not None and not spec.allow_new_classes:
        out.append(_check("expect_column_values_to_be_in_set",
                          {"column": target, "value_set": as_data_values(known_classes)},
                          f"a class the champion was never trained on (it knows {', '.join(known_classes)}); set "
                          "expectations.allow_new_classes: true if the new class is meant"))
    return out


def _check(kind: str, kwargs: dict[str, Any], hint: str) -> ExpectationSpec:
    return ExpectationSpec(type=kind, kwargs={**kwargs, "meta": {"hint": hint}})


def _text_among_numbers(series: pd.Series, numeric_share: float, ctype: str, declared: bool) -> bool:
    """Whether a column of numbers holds text: numeric by type but stored as text, or inferred categorical while
    its values are mostly numbers (a column declared categorical is taken at its word)."""
    from pandas.api.types import is_object_dtype, is_string_dtype

    if not (is_object_dtype(series.dtype) or is_string_dtype(series.dtype)):
        return False
    if ctype == "numeric":
        return True
    if ctype != "categorical" or declared:
        return False
    return MOSTLY_NUMERIC <= numeric_share < 1


def as_data_values(classes: tuple[str, ...]) -> list[Any]:
    """Class labels as the data may hold them: the model keeps labels as text, a source may hold ``3`` or ``3.0``."""
    values: list[Any] = list(classes)
    for label in classes:
        try:
            number = float(label)
        except ValueError:
            continue
        values += [number, int(number)] if number.is_integer() else [number]
    return values
