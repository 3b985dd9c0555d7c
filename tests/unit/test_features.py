"""Unit tests for the ``build_features`` step: splits, the fitted transform, and its saved form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kiln.tasks.features.splits import TARGET_COLUMN, TEST_FILE, TEST_RAW_FILE, TRAIN_FILE, VAL_FILE, load_split
from kiln.tasks.features.transform import FEATURE_SPEC_FILE, CategoricalColumn, FeatureTransform
from kiln.tasks.spec import FeaturesSpec
from kiln.tasks.steps.build_features import BuildFeaturesConfig, run_build_features

OUTPUT_FILES = (TRAIN_FILE, VAL_FILE, TEST_FILE, TEST_RAW_FILE, FEATURE_SPEC_FILE)


def write_clean(folder: Path, df: pd.DataFrame, column_types: dict[str, str], target: str, task: str) -> Path:
    """A ``clean`` step output folder as the contract describes it."""
    folder.mkdir(parents=True, exist_ok=True)
    df.to_parquet(folder / "clean.parquet", index=False)
    (folder / "clean_report.json").write_text(json.dumps({"column_types": column_types, "target": target,
                                                          "task": task}))
    return folder


def penguins_like(counts: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """Rows with two numeric columns (one with a NaN), one categorical column (one null) and a string label."""
    rng = np.random.default_rng(seed)
    labels = [label for label, n in counts.items() for _ in range(n)]
    n = len(labels)
    df = pd.DataFrame({
        "mass": rng.normal(4000, 500, n),
        "island": pd.array(rng.choice(["Biscoe", "Dream", "Torgersen"], n), dtype="string"),
        "bill": rng.normal(40, 5, n),
        "species": pd.array(labels, dtype="string"),
    })
    df.loc[3, "bill"] = np.nan
    df.loc[5, "island"] = pd.NA
    return df


TYPES = {"mass": "numeric", "island": "categorical", "bill": "numeric", "species": "categorical"}


def build(tmp_path: Path, df: pd.DataFrame, *, seed: int = 7, name: str = "out", task: str = "classification",
          target: str = "species", types: dict[str, str] = TYPES, **features) -> tuple[Path, object]:
    clean = write_clean(tmp_path / "clean", df, types, target, task)
    out = tmp_path / name
    out.mkdir()
    config = BuildFeaturesConfig(target=target, task=task, features=FeaturesSpec(**features), seed=seed)
    return out, run_build_features(config, clean, out)


def test_stratified_split_sizes_and_class_proportions(tmp_path):
    out, result = build(tmp_path, penguins_like({"Adelie": 50, "Gentoo": 30, "Chinstrap": 20}),
                        test_fraction=0.2, val_fraction=0.1)

    assert (result.n_train, result.n_val, result.n_test) == (70, 10, 20)
    assert result.classes == ("Adelie", "Chinstrap", "Gentoo")
    for split, expected in [("train", [35, 14, 21]), ("val", [5, 2, 3]), ("test", [10, 4, 6])]:
        x, y = load_split(out, split)
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape == (sum(expected), result.input_dim)
        assert np.bincount(y, minlength=3).tolist() == expected, split
    spec = json.loads((out / FEATURE_SPEC_FILE).read_text())
    assert spec["split"] == {"n_train": 70, "n_val": 10, "n_test": 20, "seed": 7, "test_fraction": 0.2,
                             "val_fraction": 0.1}


def test_same_seed_gives_identical_files_and_another_seed_a_different_split(tmp_path):
    df = penguins_like({"a": 30, "b": 30})
    first, _ = build(tmp_path, df, seed=1, name="first")
    again, _ = build(tmp_path, df, seed=1, name="again")
    other, _ = build(tmp_path, df, seed=2, name="other")

    for name in OUTPUT_FILES:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    assert not pd.read_parquet(first / TEST_RAW_FILE).equals(pd.read_parquet(other / TEST_RAW_FILE))


def test_zero_val_fraction_writes_an_empty_val_split(tmp_path):
    out, result = build(tmp_path, penguins_like({"a": 20, "b": 20}), val_fraction=0.0)

    assert (result.n_train, result.n_val, result.n_test) == (32, 0, 8)
    x, y = load_split(out, "val")
    assert x.shape == (0, result.input_dim) and y.shape == (0,)


def test_scaling_statistics_come_from_the_train_split_only(tmp_path):
    df = penguins_like({"a": 40, "b": 40})
    df["mass"] = np.arange(len(df), dtype=float) ** 2  # skewed: any test/val row shifts the mean
    out, result = build(tmp_path, df, scaling="standard")

    x_train, _ = load_split(out, "train")
    x_test, _ = load_split(out, "test")
    mass = result.feature_names.index("mass")
    assert x_train[:, mass].mean() == pytest.approx(0.0, abs=1e-5)
    assert x_train[:, mass].std() == pytest.approx(1.0, abs=1e-5)
    assert abs(x_test[:, mass].mean()) > 1e-3
    stats = json.loads((out / FEATURE_SPEC_FILE).read_text())["numeric"][0]
    assert stats["name"] == "mass" and stats["mean"] != pytest.approx(df["mass"].mean())


@pytest.mark.parametrize(("scaling", "expected", "nan_value"), [
    ("standard", [-1.224745, 0.0, 1.224745], 0.0),
    ("minmax", [0.0, 0.5, 1.0], 0.5),
    ("none", [1.0, 2.0, 3.0], 2.0),
], ids=["standard", "minmax", "none"])
def test_numeric_scaling_and_missing_values_take_the_train_mean(scaling, expected, nan_value):
    train = pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": ["p", "q", "p"]})
    t = FeatureTransform.fit(train, {"x": "numeric", "y": "categorical"}, "y", "classification", scaling, 5)

    out = t.transform(pd.DataFrame({"x": [1.0, 2.0, 3.0, np.nan]}))

    np.testing.assert_allclose(out[:, 0], [*expected, nan_value], atol=1e-6)


@pytest.mark.parametrize("scaling", ["standard", "minmax", "none"], ids=["standard", "minmax", "none"])
def test_constant_numeric_column_is_finite(scaling):
    train = pd.DataFrame({"c": [5.0, 5.0, 5.0], "y": ["a", "b", "a"]})
    t = FeatureTransform.fit(train, {"c": "numeric"}, "y", "classification", scaling, 5)

    out = t.transform(pd.DataFrame({"c": [5.0, 6.0, np.nan]}))

    assert np.isfinite(out).all()
    assert out[0, 0] == out[2, 0]  # a missing value becomes the (constant) train mean
    assert out[1, 0] - out[0, 0] == pytest.approx(1.0)  # scale 1: no division by a zero spread


def test_unseen_and_null_categories_go_to_the_unknown_bucket():
    train = pd.DataFrame({"color": pd.array(["red", "red", "blue", None], dtype="string"), "y": [1.0, 2, 3, 4]})
    t = FeatureTransform.fit(train, {"color": "categorical"}, "y", "regression", "none", 10)

    out = t.transform(pd.DataFrame({"color": pd.array(["blue", "green", None, "red"], dtype="string")}))

    assert t.feature_names == ["color=red", "color=blue", "color=__unknown__"]
    np.testing.assert_array_equal(out, [[0, 1, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]])


@pytest.mark.parametrize("column", [
    pd.Series(["2007", "x", None, "2008"], dtype="str"),
    pd.Series(["2007", "x", None, "2008"], dtype="string[python]"),
    pd.Series(["2007", "x", None, "2008"], dtype="string[pyarrow]"),
    pd.Series(["2007", "x", None, "2008"], dtype=object),
    pd.Series(["2007", "x", np.nan, "2008"], dtype="category"),
    pd.Series([2007, 2009, None, 2008], dtype="Int64"),
], ids=["str", "string-python", "string-pyarrow", "object", "category", "nullable-int"])
def test_a_category_is_looked_up_as_its_text_whatever_the_column_dtype(column):
    t = FeatureTransform("regression", "y", "none", 10, (), (CategoricalColumn("k", ("2008", "2007")),), None)

    out = t.transform(pd.DataFrame({"k": column}))

    # 2007 -> slot 1, 2008 -> slot 0; anything else and the null -> the unknown slot (2)
    np.testing.assert_array_equal(out, [[0, 1, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]])


def test_booleans_are_looked_up_as_true_and_false():
    t = FeatureTransform("regression", "y", "none", 10, (), (CategoricalColumn("k", ("True", "False")),), None)

    out = t.transform(pd.DataFrame({"k": pd.Series([False, True, None], dtype=object)}))

    np.testing.assert_array_equal(out, [[0, 1, 0], [1, 0, 0], [0, 0, 1]])


def test_vocabulary_keeps_the_most_frequent_values_with_ties_broken_by_value():
    values = ["c", "b", "a", "b", "c", "d", "e", "e"]  # b, c, e twice; a, d once
    train = pd.DataFrame({"k": pd.array(values, dtype="string"), "y": range(8)})

    t = FeatureTransform.fit(train, {"k": "categorical"}, "y", "regression", "none", max_categories=2)

    assert t.categorical[0].vocabulary == ("b", "c")
    assert t.transform(pd.DataFrame({"k": ["e"]})).tolist() == [[0.0, 0.0, 1.0]]


def test_feature_order_is_numeric_in_source_order_then_one_hot_blocks():
    pixels = [f"px{i}" for i in range(64)]
    rng = np.random.default_rng(0)
    train = pd.DataFrame(rng.integers(0, 17, (10, 64)).astype(float), columns=pixels)
    train.insert(3, "tag", pd.array(["u", "v"] * 5, dtype="string"))
    train["label"] = pd.array(list("0123401234"), dtype="string")
    types = {"label": "categorical", "tag": "categorical", **{p: "numeric" for p in reversed(pixels)}}

    t = FeatureTransform.fit(train, types, "label", "classification", "none", 50)

    assert t.feature_names == [*pixels, "tag=u", "tag=v", "tag=__unknown__"]
    np.testing.assert_array_equal(t.transform(train)[:, :64], train[pixels].to_numpy(np.float32))


def test_save_and_load_give_bit_identical_transforms(tmp_path):
    df = penguins_like({"a": 15, "b": 15, "c": 15}, seed=3)
    t = FeatureTransform.fit(df, TYPES, "species", "classification", "standard", 2)
    raw = df.assign(island=pd.array(["Atlantis"] + [None] * (len(df) - 1), dtype="string"))

    loaded = FeatureTransform.load(t.save(tmp_path / "spec.json"))

    assert loaded == t
    assert t.transform(raw).tobytes() == loaded.transform(raw).tobytes()
    np.testing.assert_array_equal(loaded.encode_target(df["species"]), t.encode_target(df["species"]))


def test_serving_reproduces_the_test_matrix_from_the_raw_test_rows(tmp_path):
    out, _ = build(tmp_path, penguins_like({"a": 20, "b": 20}))

    t = FeatureTransform.load(out / FEATURE_SPEC_FILE)
    raw = pd.read_parquet(out / TEST_RAW_FILE)
    x, y = load_split(out, "test")

    assert t.transform(raw).tobytes() == x.tobytes()
    np.testing.assert_array_equal(t.decode_target(y), raw["species"].to_numpy(object))


def test_transform_names_a_missing_input_column_and_ignores_extra_ones():
    df = penguins_like({"a": 5, "b": 5})
    t = FeatureTransform.fit(df, TYPES, "species", "classification", "standard", 10)

    assert t.transform(df.assign(extra=1.0)).shape == (10, t.input_dim)
    with pytest.raises(ValueError, match=r"\['bill'\]"):
        t.transform(df.drop(columns=["bill"]))


def test_non_numeric_value_in_a_numeric_column_is_named():
    t = FeatureTransform.fit(pd.DataFrame({"x": [1.0, 2.0], "y": ["a", "b"]}), {"x": "numeric"}, "y",
                             "classification", "standard", 5)

    with pytest.raises(ValueError, match="numeric column 'x'"):
        t.transform(pd.DataFrame({"x": ["1.5", "heavy"]}))


def test_label_unseen_in_train_is_an_error_naming_it():
    t = FeatureTransform.fit(pd.DataFrame({"x": [1.0, 2.0], "y": ["a", "b"]}), {"x": "numeric"}, "y",
                             "classification", "none", 5)

    with pytest.raises(ValueError, match=r"\['zebra'\]"):
        t.encode_target(pd.Series(["a", "zebra"]))


def test_class_with_a_single_row_cannot_be_stratified(tmp_path):
    df = penguins_like({"Adelie": 20, "Gentoo": 20, "Emperor": 1})

    with pytest.raises(ValueError, match=r"'Emperor': 1.*drop those classes or collect more data"):
        build(tmp_path, df)


def test_regression_targets_stay_unscaled_floats(tmp_path):
    df = penguins_like({"a": 30})
    types = {"mass": "numeric", "island": "categorical", "bill": "numeric"}
    out, result = build(tmp_path, df.drop(columns=["species"]), task="regression", target="mass", types=types)

    assert result.n_classes is None and result.classes is None
    assert result.feature_names[0] == "bill"
    assert sorted(result.feature_names[1:]) == ["island=Biscoe", "island=Dream", "island=Torgersen",
                                                "island=__unknown__"]
    x, y = load_split(out, "test")
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, pd.read_parquet(out / TEST_RAW_FILE)["mass"].to_numpy(np.float32))
    assert pd.read_parquet(out / TRAIN_FILE).columns.tolist()[-1] == TARGET_COLUMN


def test_clean_report_that_disagrees_with_the_config_is_rejected(tmp_path):
    df = penguins_like({"a": 10, "b": 10})
    clean = write_clean(tmp_path / "clean", df, TYPES, "island", "classification")
    config = BuildFeaturesConfig(target="species", task="classification", features=FeaturesSpec(), seed=0)

    with pytest.raises(ValueError, match="clean_report.json has target 'island'"):
        run_build_features(config, clean, tmp_path)


def test_load_split_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="run build_features first"):
        load_split(tmp_path, "train")


def test_config_from_the_example_spec_uses_the_training_seed():
    from kiln.tasks.settings import REPO_ROOT
    from kiln.tasks.spec import load_spec

    spec = load_spec(REPO_ROOT / "dags" / "pipelines" / "penguins_species.yaml")

    config = BuildFeaturesConfig.from_spec(spec)

    assert (config.target, config.task, config.seed) == ("species", "classification", spec.training.seed)
    assert config.features == spec.features
