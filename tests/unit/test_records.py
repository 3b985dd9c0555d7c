"""Unit tests for the JSON-record transform: bit-identical to the training transform, and precise about bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from kiln.tasks.features.records import MAX_ERRORS, RecordError, RecordTransform, records_from_frame
from kiln.tasks.features.transform import FeatureTransform


def random_frame(seed: int, n: int) -> pd.DataFrame:
    """Numeric columns with NaN, an int numeric column, string/int/float/bool categorical columns with nulls."""
    rng = np.random.default_rng(seed)
    nan_mask = rng.random(n) < 0.2

    def with_nulls(values: list) -> list:
        return [None if rng.random() < 0.15 else v for v in values]

    return pd.DataFrame({
        "x": np.where(nan_mask, np.nan, rng.normal(3.0, 2.0, n) * 10.0 ** rng.integers(-3, 4, n)),
        "count": rng.integers(-5, 1000, n),
        "big": rng.normal(0, 1e12, n),
        "color": pd.array(with_nulls(list(rng.choice(["red", "green", "blue", "teal", "pink"], n))),
                          dtype="string"),
        "year": rng.choice([2007, 2008, 2009, 2010], n),  # int-coded: the vocabulary holds "2007"
        "code": with_nulls([float(v) for v in rng.choice([1.0, 2.0, 3.5, 1e16], n)]),  # float: "1.0", "3.5"
        "flag": with_nulls([bool(v) for v in rng.random(n) < 0.5]),
        "y": rng.choice(["a", "b"], n),
    })


TYPES = {"x": "numeric", "count": "numeric", "big": "numeric", "color": "categorical", "year": "categorical",
         "code": "categorical", "flag": "categorical", "y": "categorical"}


def fit(df: pd.DataFrame, scaling: str = "standard", max_categories: int = 3) -> FeatureTransform:
    return FeatureTransform.fit(df, TYPES, "y", "classification", scaling, max_categories)


@pytest.mark.parametrize("scaling", ["standard", "minmax", "none"])
@pytest.mark.parametrize("seed", range(8))
def test_records_give_the_training_matrix_bit_for_bit(seed, scaling):
    train, test = random_frame(seed, 200), random_frame(seed + 100, 60)  # test holds values the vocabulary lacks
    transform = fit(train, scaling)
    records = json.loads(json.dumps(records_from_frame(test)))

    got = RecordTransform(transform)(records)

    assert got.dtype == np.float32 and got.shape == (60, transform.input_dim)
    assert np.array_equal(got, transform.transform(test))
    assert np.array_equal(got, transform.transform(pd.DataFrame(records)))


@pytest.mark.parametrize("seed", range(4))
def test_records_from_pandas_to_json_give_the_training_matrix(seed):
    # to_json keeps 10 significant digits: values with fewer survive it exactly, as with real measurements.
    train, test = random_frame(seed, 200), random_frame(seed + 50, 40)
    for df in (train, test):
        df["x"], df["big"] = df["x"].round(3), df["big"].round(-3)
    transform = fit(train)

    got = RecordTransform(transform)(json.loads(test.to_json(orient="records")))

    assert np.array_equal(got, transform.transform(test))


def penguins() -> pd.DataFrame:
    from palmerpenguins import load_penguins

    return load_penguins()


PENGUIN_TYPES = {"island": "categorical", "bill_length_mm": "numeric", "bill_depth_mm": "numeric",
                 "flipper_length_mm": "numeric", "body_mass_g": "numeric", "sex": "categorical",
                 "year": "categorical", "species": "categorical"}


def test_penguin_records_give_the_training_matrix():
    df = penguins()  # raw: missing measurements and sex, year as int64
    transform = FeatureTransform.fit(df.iloc[::2], PENGUIN_TYPES, "species", "classification", "standard", 10)
    records = json.loads(df.to_json(orient="records"))

    got = RecordTransform(transform)(records)

    assert np.array_equal(got, transform.transform(df))
    assert set(transform.categorical[2].vocabulary) == {"2007", "2008", "2009"}  # int column: "2007", not "2007.0"


def test_missing_penguin_values_are_imputed_and_unknown_like_training():
    df = penguins()
    transform = FeatureTransform.fit(df, PENGUIN_TYPES, "species", "classification", "standard", 10)
    row = {"island": "Dream", "bill_length_mm": None, "bill_depth_mm": 18.1, "flipper_length_mm": None,
           "body_mass_g": 3900, "sex": None, "year": 2008, "species": "ignored", "id": 17}

    got = RecordTransform(transform)([row])

    names = transform.feature_names
    assert got[0, names.index("bill_length_mm")] == 0.0  # the train mean, standardised
    assert got[0, names.index("sex=__unknown__")] == 1.0
    assert got[0, names.index("year=2008")] == 1.0
    assert np.array_equal(got, transform.transform(pd.DataFrame([row])))


def vocabulary_transform(values: list, dtype: str | None = None) -> FeatureTransform:
    df = pd.DataFrame({"v": pd.Series(values, dtype=dtype), "y": ["a", "b"] * (len(values) // 2)})
    return FeatureTransform.fit(df, {"v": "categorical", "y": "categorical"}, "y", "classification", "none", 10)


@pytest.mark.parametrize(("train_values", "dtype", "sent", "slot"), [
    ([2007, 2008], "int64", 2007.0, "2007"),
    ([2007.0, None], "float64", 2007, "2007.0"),
    ([2007.0, None], "float64", 2007.0, "2007.0"),
    (["2007", "2008"], "string", 2007, "2007"),
    ([1e16, 2.5], "float64", 10 ** 16, "1e+16"),
    ([10 ** 16, 3], "int64", 1e16, "10000000000000000"),
    ([True, False], "bool", True, "True"),
], ids=["int_vocab_float_sent", "float_vocab_int_sent", "float_vocab_float_sent", "string_vocab_int_sent",
        "big_float_vocab_int_sent", "big_int_vocab_float_sent", "bool"])
def test_integral_numbers_find_their_category_in_either_form(train_values, dtype, sent, slot):
    transform = vocabulary_transform(train_values, dtype)

    got = RecordTransform(transform)([{"v": sent}])

    assert transform.feature_names[int(got[0].argmax())] == f"v={slot}"


@pytest.mark.parametrize(("train_values", "dtype", "sent"), [
    ([2007, 2008], "int64", 2007.5),
    ([1, 0], "int64", True),
    (["True", "x"], "string", 1),
    (["2007.0", "x"], "string", "2007"),
], ids=["fraction", "bool_is_not_one", "one_is_not_true", "strings_compare_exactly"])
def test_values_outside_the_vocabulary_set_the_unknown_slot(train_values, dtype, sent):
    transform = vocabulary_transform(train_values, dtype)

    got = RecordTransform(transform)([{"v": sent}])

    assert transform.feature_names[int(got[0].argmax())] == "v=__unknown__"


def small_transform() -> FeatureTransform:
    df = pd.DataFrame({"length": [1.0, 2.0, 3.0, 4.0], "island": ["A", "B", "A", "B"], "y": ["p", "q", "p", "q"]})
    return FeatureTransform.fit(df, {"length": "numeric", "island": "categorical", "y": "categorical"}, "y",
                                "classification", "standard", 10)


GOOD = {"length": 2.5, "island": "A"}


@pytest.mark.parametrize(("records", "field", "message"), [
    ({"length": 1.0}, "records", "expected a non-empty list of records (JSON objects), found an object"),
    (None, "records", "found null"),
    ("abc", "records", "found 'abc'"),
    ([], "records", "found an empty list"),
    ([GOOD, [1, "A"]], "records[1]", "expected a JSON object, found an array"),
    ([GOOD, 7], "records[1]", "expected a JSON object, found 7"),
    ([{"island": "A"}], "records[0].length", "missing"),
    ([{**GOOD, "length": "abc"}], "records[0].length", "expected a number or null, found 'abc'"),
    ([{**GOOD, "length": "2.5"}], "records[0].length", "expected a number or null, found '2.5'"),
    ([{**GOOD, "length": True}], "records[0].length", "expected a number or null, found true"),
    ([{**GOOD, "length": float("nan")}], "records[0].length", "expected a finite number or null, found NaN"),
    ([{**GOOD, "length": float("-inf")}], "records[0].length", "found -Infinity"),
    ([{**GOOD, "length": 10 ** 400}], "records[0].length", "number out of range"),
    ([{**GOOD, "length": [1.0]}], "records[0].length", "found an array"),
    ([{**GOOD, "island": {"name": "A"}}], "records[0].island", "expected a string, number, boolean or null, "
                                                                "found an object"),
    ([{**GOOD, "island": float("inf")}], "records[0].island", "found Infinity"),
    ([{"length": 1.0}], "records[0].island", "missing"),
], ids=["object_instead_of_list", "null", "string", "empty", "array_record", "number_record", "missing_numeric",
        "numeric_text", "numeric_numeric_text", "numeric_bool", "numeric_nan", "numeric_infinity", "numeric_huge_int",
        "numeric_array", "categorical_object", "categorical_infinity", "missing_categorical"])
def test_bad_records_are_rejected_naming_the_field(records, field, message):
    with pytest.raises(RecordError) as info:
        RecordTransform(small_transform())(records)

    assert len(info.value.errors) == 1
    assert info.value.errors[0]["field"] == field
    assert message in info.value.errors[0]["message"]
    assert field in str(info.value)


def test_every_problem_of_a_request_is_listed_in_order():
    records = [GOOD, {"length": "x"}, "not an object", {"length": None, "island": ["A"], "extra": object()}]

    with pytest.raises(RecordError) as info:
        RecordTransform(small_transform())(records)

    assert [e["field"] for e in info.value.errors] == ["records[1].length", "records[1].island", "records[2]",
                                                       "records[3].island"]
    assert str(info.value).startswith("4 problem(s) in the request records: records[1].length: expected a number")


def test_problems_beyond_the_limit_are_summarised():
    records = [{"length": "x", "island": "A"}] * (MAX_ERRORS + 5)

    with pytest.raises(RecordError) as info:
        RecordTransform(small_transform())(records)

    errors = info.value.errors
    assert len(errors) == MAX_ERRORS + 1
    assert errors[MAX_ERRORS - 1]["field"] == f"records[{MAX_ERRORS - 1}].length"
    assert errors[-1] == {"field": "records", "message": f"more problems not listed (stopped after {MAX_ERRORS})"}


def test_exactly_the_limit_of_problems_has_no_summary_entry():
    records = [{"length": "x", "island": "A"}] * MAX_ERRORS + [GOOD] * 3

    with pytest.raises(RecordError) as info:
        RecordTransform(small_transform())(records)

    assert len(info.value.errors) == MAX_ERRORS
    assert all(e["field"].endswith(".length") for e in info.value.errors)


@pytest.mark.parametrize("columns", [["length", "y"], ["island", "y"]], ids=["numeric_only", "categorical_only"])
def test_transforms_with_one_kind_of_column(columns):
    df = pd.DataFrame({"length": [1.0, 2.0, np.nan, 4.0], "island": ["A", None, "A", "B"],
                       "y": ["p", "q", "p", "q"]})[columns]
    types = {"length": "numeric", "island": "categorical", "y": "categorical"}
    transform = FeatureTransform.fit(df, {c: types[c] for c in columns}, "y", "classification", "minmax", 10)

    got = RecordTransform(transform)(records_from_frame(df))

    assert np.array_equal(got, transform.transform(df))


def test_records_from_frame_keeps_floats_exact_and_nulls_as_none():
    df = pd.DataFrame({"f": [0.1 + 0.2, np.nan], "i": [1, 2], "s": pd.array(["a", None], dtype="string"),
                       "b": [True, False]})

    records = records_from_frame(df)

    assert records == [{"f": 0.30000000000000004, "i": 1, "s": "a", "b": True},
                       {"f": None, "i": 2, "s": None, "b": False}]
    assert [type(v) for v in records[0].values()] == [float, int, str, bool]
