"""Unit tests for the ``validate`` step: the inferred suite, GX runs on good and bad data, the comparison with the
accepted profile, reports and errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from kiln.tasks.features.profile import PROFILE_FILE, profile_parquet
from kiln.tasks.pipeline.accepted import Accepted
from kiln.tasks.pipeline.keys import DATA_DOCS_DIR as DOCS_DIR
from kiln.tasks.pipeline.keys import SNAPSHOT_FILE, VALIDATION_FILE
from kiln.tasks.spec import ExpectationSpec, ExpectationsSpec, load_spec
from kiln.tasks.spec.data import ProfileBoundsSpec
from kiln.tasks.steps.ingest import IngestConfig, run_ingest
from kiln.tasks.steps.validate import DataValidationError, ValidateConfig, build_expectations, run_validate

REPO = Path(__file__).resolve().parents[2]


def good_frame(n: int = 12) -> pd.DataFrame:
    return pd.DataFrame({
        "label": ["a", "b", "c"] * (n // 3),
        "mass": [float(i) for i in range(n)],
        "island": pd.array(["x", None] * (n // 2), dtype="str"),
        "note": [None] * n,
    })


def config(declared: list[dict] | None = None, columns: dict | None = None, min_rows: int = 10,
           infer_defaults: bool = True, target: str = "label") -> ValidateConfig:
    return ValidateConfig(
        target=target, task="classification", columns={"note": "ignore"} if columns is None else columns,
        expectations=ExpectationsSpec(infer_defaults=infer_defaults, min_rows=min_rows,
                                      declared=[ExpectationSpec(**d) for d in declared or []]))


def snapshot(tmp_path: Path, df: pd.DataFrame) -> Path:
    folder = tmp_path / "snap"
    folder.mkdir(parents=True)
    df.to_parquet(folder / SNAPSHOT_FILE, index=False)
    return folder


def out_dir(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    return out


def suite(cfg: ValidateConfig, df: pd.DataFrame, tmp_path: Path) -> list[ExpectationSpec]:
    """The suite ``validate`` builds for ``df``: from its dtypes and its profile."""
    folder = snapshot(tmp_path / "suite", df)
    return build_expectations(cfg, df, profile_parquet(folder / SNAPSHOT_FILE))


def kinds(specs: list[ExpectationSpec]) -> list[tuple[str, str | None]]:
    return [(s.type, s.kwargs.get("column")) for s in specs]


def test_build_expectations_infers_defaults_from_schema(tmp_path):
    declared = {"type": "expect_column_values_to_be_between", "kwargs": {"column": "mass", "min_value": 0}}
    specs = suite(config([declared], min_rows=5), good_frame(), tmp_path)
    assert specs[0].type == "expect_table_row_count_to_be_between" and specs[0].kwargs["min_value"] == 5
    got = kinds(specs)
    assert ("expect_column_to_exist", "note") in got and ("expect_column_to_exist", "label") in got
    assert ("expect_column_values_to_not_be_null", "label") in got
    non_null = [c for t, c in got if t == "expect_column_proportion_of_non_null_values_to_be_between"]
    assert non_null == ["label", "mass", "island"]  # "note" is ignored
    assert [c for t, c in got if t == "expect_column_values_to_be_in_type_list"] == ["mass"]
    assert specs[-1] == ExpectationSpec(**declared)


def test_build_expectations_without_defaults_is_min_rows_and_the_declared(tmp_path):
    """infer_defaults: false drops the schema defaults, not the row count the spec sets explicitly."""
    declared = {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "mass"}}
    specs = suite(config([declared], infer_defaults=False, min_rows=7), good_frame(), tmp_path)
    assert kinds(specs) == [("expect_table_row_count_to_be_between", None), ("expect_column_values_to_be_unique",
                                                                            "mass")]
    assert specs[0].kwargs["min_value"] == 7


def test_build_expectations_absent_columns_get_only_an_existence_check(tmp_path):
    specs = suite(config(columns={"gone": "numeric"}, target="nolabel"), good_frame(), tmp_path)
    got = kinds(specs)
    assert ("expect_column_to_exist", "gone") in got and ("expect_column_to_exist", "nolabel") in got
    assert [c for _, c in got].count("gone") == 1 and [c for _, c in got].count("nolabel") == 1


def test_good_data_passes_and_writes_report_and_data_docs(tmp_path):
    declared = {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "label", "value_set": list("abc")}}
    out = out_dir(tmp_path)
    result = run_validate(config([declared]), snapshot(tmp_path, good_frame()), out)

    assert result.success and result.failed == []
    assert result.evaluated == len(suite(config([declared]), good_frame(), tmp_path))
    report = json.loads((out / VALIDATION_FILE).read_text())
    assert report["success"] is True
    assert report["statistics"]["evaluated_expectations"] == result.evaluated
    entry = next(e for e in report["expectations"] if e["type"] == "expect_column_values_to_be_in_set")
    assert entry["kwargs"] == {"column": "label", "value_set": ["a", "b", "c"]} and entry["unexpected_count"] == 0
    assert (out / DOCS_DIR / "index.html").is_file()
    assert result.report_file == str(out / VALIDATION_FILE)
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()
    result.raise_for_failure()  # no error


def test_bad_data_fails_with_each_failed_expectation_listed(tmp_path):
    df = pd.DataFrame({
        "label": ["a", None, "b", "z", "z", "a"],
        "mass": ["1", "2", "heavy", "4", "5", "6"],  # declared numeric, but strings
        "empty": [None] * 6,
    })
    declared = {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "label", "value_set": ["a", "b"]}}
    out = out_dir(tmp_path)
    result = run_validate(config([declared], columns={"mass": "numeric"}), snapshot(tmp_path, df), out)

    assert not result.success
    failed = {(f["type"], f["column"]): f for f in result.failed}
    # One missing label in six is within max_missing_target_share: clean drops and counts it.
    assert set(failed) == {
        ("expect_table_row_count_to_be_between", None),
        ("expect_column_proportion_of_non_null_values_to_be_between", "empty"),
        ("expect_column_values_to_be_in_type_list", "mass"),
        ("expect_column_values_to_match_regex", "mass"),
        ("expect_column_values_to_be_in_set", "label"),
    }
    assert failed[("expect_column_values_to_match_regex", "mass")]["examples"] == ["heavy"]
    assert failed[("expect_column_values_to_be_in_set", "label")]["unexpected_count"] == 2
    assert failed[("expect_column_values_to_be_in_set", "label")]["examples"] == ["z", "z"]
    assert failed[("expect_table_row_count_to_be_between", None)]["observed_value"] == 6
    report = json.loads((out / VALIDATION_FILE).read_text())
    assert report["success"] is False
    assert (out / DOCS_DIR / "index.html").is_file()  # the evidence exists before the caller raises

    with pytest.raises(DataValidationError) as exc:
        result.raise_for_failure()
    assert exc.value.result is result
    msg = str(exc.value)
    assert "5 of" in msg
    assert "expect_column_values_to_be_in_set column 'label': 2 unexpected values, e.g. ['z', 'z']" in msg
    assert "expect_column_values_to_match_regex column 'mass': 1 unexpected values, e.g. ['heavy'] (a column of " \
           "numbers with some text in it" in msg
    assert "column 'mass'" in msg and "observed str" in msg


def test_declared_expectation_on_absent_column_fails_with_the_error(tmp_path):
    declared = {"type": "expect_column_values_to_be_between", "kwargs": {"column": "weight", "min_value": 0}}
    result = run_validate(config([declared], infer_defaults=False), snapshot(tmp_path, good_frame()),
                          out_dir(tmp_path))
    assert not result.success
    (failed,) = result.failed
    assert failed["column"] == "weight" and "does not exist" in failed["error"]


@pytest.mark.parametrize(("declared", "needles"), [
    ({"type": "expect_colum_values_to_be_between", "kwargs": {"column": "mass"}},
     ["expectations.declared[0]", "'expect_colum_values_to_be_between'", "unknown expectation type",
      "did you mean 'expect_column_values_to_be_between'"]),
    ({"type": "expect_column_values_to_be_between", "kwargs": {"column": "mass", "min_vale": 0}},
     ["expectations.declared[0]", "'expect_column_values_to_be_between'", "unknown kwarg 'min_vale'",
      "did you mean 'min_value'", "Allowed kwargs:"]),
    ({"type": "expect_column_values_to_be_in_set", "kwargs": {"value_set": [1]}},
     ["'expect_column_values_to_be_in_set'", "kwarg 'column' is required"]),
], ids=["unknown-type", "misspelt-kwarg", "missing-kwarg"])
def test_bad_declared_expectations_raise_before_anything_is_written(tmp_path, declared, needles):
    out = out_dir(tmp_path)
    with pytest.raises(ValueError) as exc:
        run_validate(config([declared]), snapshot(tmp_path, good_frame()), out)
    for needle in needles:
        assert needle in str(exc.value)
    assert list(out.iterdir()) == []


def test_missing_snapshot_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="run ingest first"):
        run_validate(config(), tmp_path / "nowhere", out_dir(tmp_path))


def test_penguins_spec_validates(tmp_path):
    spec = load_spec(REPO / "dags/pipelines/penguins_species.yaml")
    ingest_dir = tmp_path / "ingest"
    ingest_dir.mkdir()
    assert run_ingest(IngestConfig(spec.source), ingest_dir).rows == 344
    cfg = ValidateConfig(spec.target, spec.task, dict(spec.columns), spec.expectations)
    result = run_validate(cfg, ingest_dir, out_dir(tmp_path))
    assert result.success, result.failed
    assert result.evaluated >= 2 + len(spec.expectations.declared)


def accepted_record(tmp_path: Path, df: pd.DataFrame) -> Accepted:
    path = tmp_path / "accepted.parquet"
    df.to_parquet(path, index=False)
    return Accepted(run_key="t/first", manifest={"rows": len(df)}, profile=profile_parquet(path).to_dict())


def test_a_snapshot_that_moved_from_the_accepted_profile_fails_naming_the_column_and_both_figures(tmp_path):
    accepted = accepted_record(tmp_path, good_frame(60))
    moved = good_frame(60)
    moved["mass"] = moved["mass"].where(moved.index % 20 == 0)  # 95 % missing: every default expectation passes
    out = out_dir(tmp_path)
    result = run_validate(config(), snapshot(tmp_path, moved), out, accepted)

    assert not result.success and result.failed == [] and result.compared_with == "t/first"
    (breach,) = result.breaches
    assert (breach["check"], breach["column"], breach["value"], breach["previous"]) == ("missing_share", "mass",
                                                                                        0.95, 0.0)
    report = json.loads((out / VALIDATION_FILE).read_text())
    assert report["success"] is False and report["profile"]["breaches"] == result.breaches
    assert report["profile"]["compared_with"] == "t/first"
    assert report["profile"]["profile"]["columns"]["mass"]["missing"] == 57
    assert json.loads((out / PROFILE_FILE).read_text()) == report["profile"]["profile"]
    with pytest.raises(DataValidationError) as exc:
        result.raise_for_failure()
    msg = str(exc.value)
    assert msg.startswith("data validation failed: the snapshot moved past 1 profile bounds from the last accepted "
                          "snapshot (run t/first; report: ")
    assert "column 'mass': missing share 0.95, was 0.00 (bound: rise <= 0.20, " \
           "expectations.profile.max_missing_increase)" in msg
    assert "expectations failed" not in msg


def test_the_profile_is_written_but_not_compared_when_off_or_first(tmp_path):
    moved = good_frame(60)
    moved["mass"] = None
    moved["mass"] = moved["mass"].astype(float)
    moved.loc[0, "mass"] = 1.0
    accepted = accepted_record(tmp_path, good_frame(60))
    off = config()
    off = ValidateConfig(off.target, off.task, off.columns, off.expectations.model_copy(
        update={"profile": ProfileBoundsSpec(enabled=False)}))
    for cfg, previous, name in ((off, accepted, "off"), (config(), None, "first")):
        (tmp_path / name).mkdir()
        result = run_validate(cfg, snapshot(tmp_path / name, moved), out_dir(tmp_path / name), previous)
        assert result.success and result.breaches == [] and result.compared_with is None, name
        assert json.loads(Path(result.profile_file).read_text())["rows"] == 60


def test_a_damaged_accepted_profile_names_the_record_to_delete(tmp_path):
    damaged = Accepted(run_key="t/first", manifest={}, profile={"rows": 5})
    with pytest.raises(ValueError, match=r"accepted snapshot \(run t/first\) cannot be read: not a data profile.*"
                                         r"delete t/_accepted"):
        run_validate(config(), snapshot(tmp_path, good_frame()), out_dir(tmp_path), damaged)


@pytest.mark.parametrize("values, classes, unseen", [
    (["a", "b", "c", None] * 3, ("a", "b", "c"), []),
    (["a", "b", "d", None] * 3, ("a", "b", "c"), ["d"]),
    ([1, 2, 3] * 4, ("1", "2", "3"), []),
    ([1.0, 2.0, float("nan")] * 4, ("1", "2"), []),
    ([1, 2, 4] * 4, ("1", "2"), ["4"]),
], ids=["text", "text-new-class", "integers-as-labels", "floats-with-nan", "integer-new-class"])
def test_new_classes_is_empty_exactly_when_the_champion_check_passes(tmp_path, values, classes, unseen):
    """The step cache keys validate on these classes (kiln.tasks.pipeline.cache_keys.new_classes) because the
    champion's in-set check passes exactly when there are none: checked here against Great Expectations itself."""
    from kiln.tasks.pipeline.cache_keys import new_classes

    folder = snapshot(tmp_path, pd.DataFrame({"label": values, "mass": [float(i) for i in range(len(values))]}))
    assert new_classes(folder / SNAPSHOT_FILE, "label", classes) == unseen
    assert new_classes(folder / SNAPSHOT_FILE, "label", None) == [], "no champion, no check"
    result = run_validate(replace(config(columns={}), known_classes=classes), folder, out_dir(tmp_path))
    report = json.loads(Path(result.report_file).read_text())
    (check,) = [e for e in report["expectations"] if e["type"] == "expect_column_values_to_be_in_set"]
    assert check["success"] is (unseen == [])
