"""Unit tests for the ``clean`` step: rule order and effects, policies, the report, and every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kiln.tasks.features.column_types import SchemaError
from kiln.tasks.pipeline.keys import CLEAN_FILE, SNAPSHOT_FILE
from kiln.tasks.pipeline.keys import CLEAN_REPORT_FILE as REPORT_FILE
from kiln.tasks.spec import CleaningSpec, load_spec
from kiln.tasks.steps.clean import CleanConfig, CleanError, run_clean
from kiln.tasks.steps.ingest import IngestConfig, run_ingest
from kiln.tasks.steps.validate import ValidateConfig, run_validate

REPO = Path(__file__).resolve().parents[2]


def frame() -> pd.DataFrame:
    return pd.DataFrame({
        "id": [1, 2, 3, 4, 5, 6, 7],
        "label": ["a", "b", None, "a", "b", "a", "a"],
        "mass": ["1.5", "2.5", "3", "oops", None, "4", "1.5"],  # the last row repeats the first
        "island": ["x", None, "y", "x", "y", None, "x"],
        "year": [2007.0, 2008.0, None, 2007.0, 2008.0, None, 2007.0],
    })


def snapshot(tmp_path: Path, df: pd.DataFrame) -> Path:
    folder = tmp_path / "snap"
    folder.mkdir(exist_ok=True)
    df.to_parquet(folder / SNAPSHOT_FILE, index=False)
    return folder


def clean(tmp_path: Path, df: pd.DataFrame, cleaning: dict | None = None, columns: dict | None = None,
          target: str = "label", task: str = "classification", out: str = "out"):
    out_dir = tmp_path / out
    out_dir.mkdir()
    cfg = CleanConfig(target=target, task=task, columns={"id": "ignore"} if columns is None else columns,
                      cleaning=CleaningSpec.model_validate(cleaning or {}))
    result = run_clean(cfg, snapshot(tmp_path, df), out_dir)
    return result, pd.read_parquet(out_dir / CLEAN_FILE), json.loads((out_dir / REPORT_FILE).read_text())


def test_default_policy_end_to_end(tmp_path):
    result, df, report = clean(tmp_path, frame(), columns={"id": "ignore", "mass": "numeric", "year": "categorical"})

    assert (result.rows_in, result.rows_out, result.dropped) == (7, 5, 2)  # the missing label, the duplicate
    assert list(df.columns) == ["label", "mass", "island", "year"]
    assert result.column_types == {"label": "categorical", "mass": "numeric", "island": "categorical",
                                   "year": "categorical"}
    assert df["label"].notna().all()
    assert df["mass"].dtype == "float64" and df["mass"].isna().sum() == 0
    assert df["mass"].tolist() == [1.5, 2.5, 2.5, 2.5, 4.0]  # "oops" and None -> the median
    assert df["island"].tolist() == ["x", "__missing__", "x", "y", "__missing__"]
    assert df["year"].tolist() == ["2007", "2008", "2007", "2008", "__missing__"]  # not "2007.0"

    rules = [(r["rule"], r["column"]) for r in report["rules"]]
    assert rules == [("drop_ignored", "id"), ("coerce_numeric", "mass"), ("coerce_categorical", "year"),
                     ("drop_missing_target", "label"), ("drop_duplicates", None), ("missing_median", "mass"),
                     ("missing_constant", "island"), ("missing_constant", "year")]
    by_rule = {(r["rule"], r["column"]): r for r in report["rules"]}
    assert by_rule[("coerce_numeric", "mass")]["changed"] == 1  # "oops"
    assert by_rule[("drop_missing_target", "label")]["dropped"] == 1
    assert by_rule[("drop_duplicates", None)]["dropped"] == 1
    assert by_rule[("missing_median", "mass")]["changed"] == 2
    assert report["rows_in"] == 7 and report["rows_out"] == 5
    assert report["target"] == "label" and report["task"] == "classification"
    assert list(report["column_types"]) == ["label", "mass", "island", "year"]
    assert result.report_file.endswith(REPORT_FILE)


@pytest.mark.parametrize(("drop", "rows"), [(True, 3), (False, 5)], ids=["drop-duplicates", "keep-duplicates"])
def test_drop_duplicates(tmp_path, drop, rows):
    df = pd.DataFrame({"y": ["a", "a", "b", "b", "c"], "x": [1, 1, 2, 2, 3]})
    result, _, _ = clean(tmp_path, df, {"drop_duplicates": drop}, columns={}, target="y")
    assert result.rows_out == rows


@pytest.mark.parametrize(("policy", "rows", "values"), [
    ({"missing": "drop_row"}, 4, [1.0, 2.0, 10.0, 3.0]),
    ({"missing": "mean"}, 5, [1.0, 2.0, 4.0, 10.0, 3.0]),
    ({"missing": "median"}, 5, [1.0, 2.0, 2.5, 10.0, 3.0]),
    ({"missing": "mode"}, 5, [1.0, 2.0, 1.0, 10.0, 3.0]),
    ({"missing": "constant", "fill_value": -1}, 5, [1.0, 2.0, -1.0, 10.0, 3.0]),
    ({"missing": "keep"}, 5, [1.0, 2.0, np.nan, 10.0, 3.0]),
    ({"outliers": "clip_iqr", "iqr_factor": 1.0}, 5, [1.0, 2.0, 2.5, 4.0, 3.0]),  # median fill first; Q1 2, Q3 3
    ({"missing": "keep", "outliers": "drop_iqr", "iqr_factor": 1.0}, 4, [1.0, 2.0, np.nan, 3.0]),
], ids=["drop_row", "mean", "median", "mode", "constant", "keep", "clip_iqr", "drop_iqr-keeps-missing"])
def test_numeric_column_policies(tmp_path, policy, rows, values):
    df = pd.DataFrame({"y": list("abcde"), "x": [1.0, 2.0, None, 10.0, 3.0]})
    result, out, _ = clean(tmp_path, df, {"columns": {"x": policy}}, columns={}, target="y")
    assert result.rows_out == rows
    np.testing.assert_allclose(out["x"].to_numpy(), values)


@pytest.mark.parametrize(("policy", "values"), [
    ({"missing": "mode"}, ["p", "q", "p", "p"]),
    ({"missing": "constant", "fill_value": 1}, ["p", "q", "1", "p"]),
    ({}, ["p", "q", "__missing__", "p"]),
], ids=["mode", "constant-number-as-label", "default-constant"])
def test_categorical_column_policies(tmp_path, policy, values):
    df = pd.DataFrame({"y": list("abcd"), "c": ["p", "q", None, "p"]})
    _, out, _ = clean(tmp_path, df, {"columns": {"c": policy}} if policy else {}, columns={}, target="y")
    assert out["c"].tolist() == values


def test_regression_target_is_coerced_and_missing_targets_dropped(tmp_path):
    df = pd.DataFrame({"y": ["1.5", "n/a", "3", None], "x": [1, 2, 3, 4]})
    result, out, _ = clean(tmp_path, df, columns={}, target="y", task="regression")
    assert result.rows_out == 2
    assert out["y"].tolist() == [1.5, 3.0]
    assert result.column_types["y"] == "numeric"


@pytest.mark.parametrize(("cleaning", "columns", "target", "task", "needles"), [
    ({"columns": {"masss": {"missing": "mean"}}}, {}, "label", "classification",
     ["cleaning.columns.masss", "'masss' is not in the data", "Did you mean 'mass'?"]),
    ({"columns": {"island": {"missing": "median"}}}, {}, "label", "classification",
     ["cleaning.columns.island", "missing 'median' does not apply to a categorical column",
      "allowed: drop_row, mode, constant, keep"]),
    ({"columns": {"mass": {"missing": "constant"}}}, {}, "label", "classification",
     ["cleaning.columns.mass", "needs a fill_value"]),
    ({"columns": {"mass": {"missing": "constant", "fill_value": "heavy"}}}, {}, "label", "classification",
     ["cleaning.columns.mass", "'heavy' is not a number"]),
    ({"columns": {"island": {"outliers": "clip_iqr"}}}, {}, "label", "classification",
     ["cleaning.columns.island", "numeric columns only"]),
    ({"columns": {"id": {"missing": "mean"}}}, {"id": "ignore"}, "label", "classification",
     ["cleaning.columns.id", "type 'ignore'"]),
    ({"columns": {"label": {"missing": "mode"}}}, {}, "label", "classification",
     ["cleaning.columns.label", "always dropped"]),
    ({"default_categorical": {"missing": "mean"}}, {}, "label", "classification",
     ["cleaning.default_categorical", "missing 'mean'"]),
    ({}, {"label": "categorical"}, "label", "regression", ["regression target must be numeric"]),
    ({}, {}, "label", "regression", ["regression target 'label' holds no numbers"]),
    ({"columns": {"year": {"missing": "drop_row"}}, "default_categorical": {"missing": "drop_row"}}, {}, "label",
     "classification", ["rule missing_drop_row on column 'year' removed the last"]),
    ({}, {}, "year", "regression", ["rule drop_missing_target on column 'year' removed the last"]),
    ({"columns": {"empty": {"missing": "median"}}}, {}, "label", "classification",
     ["column 'empty' is entirely missing"]),
], ids=["policy-for-absent-column", "median-on-categorical", "constant-without-fill", "non-numeric-fill",
        "outliers-on-categorical", "policy-on-ignored", "missing-policy-on-target", "bad-default",
        "regression-target-declared-categorical", "regression-target-not-numbers", "drop-row-empties-data",
        "all-targets-missing", "median-of-nothing"])
def test_bad_policies_raise_clear_errors_and_write_nothing(tmp_path, cleaning, columns, target, task, needles):
    df = pd.DataFrame({"label": ["a", "b", "a"], "mass": [1.0, None, 3.0], "island": ["x", None, "y"],
                       "year": [None, 2008.0, None], "empty": [np.nan] * 3, "id": [1, 2, 3]})
    if target == "year":
        df["year"] = np.nan
    out = tmp_path / "out"
    out.mkdir()
    cfg = CleanConfig(target=target, task=task, columns=columns, cleaning=CleaningSpec.model_validate(cleaning))
    with pytest.raises(CleanError) as exc:
        run_clean(cfg, snapshot(tmp_path, df), out)
    for needle in needles:
        assert needle in str(exc.value)
    assert list(out.iterdir()) == []


def test_declared_column_absent_from_data_is_a_schema_error(tmp_path):
    with pytest.raises(SchemaError, match="'wieght'"):
        clean(tmp_path, frame(), columns={"wieght": "numeric"})
    assert list((tmp_path / "out").iterdir()) == []


def test_penguins_spec_ingest_validate_clean(tmp_path):
    spec = load_spec(REPO / "dags/pipelines/penguins_species.yaml")
    dirs = {name: tmp_path / name for name in ("ingest", "validate", "clean")}
    for d in dirs.values():
        d.mkdir()
    assert run_ingest(IngestConfig(spec.source), dirs["ingest"]).rows == 344
    validation = run_validate(ValidateConfig(spec.target, spec.task, dict(spec.columns), spec.expectations),
                              dirs["ingest"], dirs["validate"])
    assert validation.success, validation.failed
    cfg = CleanConfig(spec.target, spec.task, dict(spec.columns), spec.cleaning)
    result = run_clean(cfg, dirs["ingest"], dirs["clean"])

    df = pd.read_parquet(dirs["clean"] / CLEAN_FILE)
    assert result.rows_out == len(df) == 344
    assert df.notna().all().all()  # every missing measurement and sex filled
    assert set(df["sex"]) == {"male", "female", "unknown"}
    assert set(df["year"]) == {"2007", "2008", "2009"}
    assert result.column_types["species"] == "categorical" and result.column_types["body_mass_g"] == "numeric"
