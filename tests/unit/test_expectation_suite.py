"""Unit tests for running the suite on a snapshot in bounded memory: what each expectation reads, and that reading
one expectation's columns at a time gives the report that one whole-frame run gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kiln.tasks.features.expectation_report import expectation_report
from kiln.tasks.features.expectation_suite import Read, plan_reads, run_suite
from kiln.tasks.spec import ExpectationSpec

pytestmark = pytest.mark.filterwarnings("ignore:.*(condition_parser|row_condition).*:DeprecationWarning")

COLUMNS = ["label", "mass", "island", "sex", "year"]


def spec(kind: str, **kwargs) -> ExpectationSpec:
    return ExpectationSpec(type=kind, kwargs=kwargs)


#: Expectations of every kind of domain, several failing, one on a column that is not in the data.
SUITE = [
    spec("expect_table_row_count_to_be_between", min_value=10),
    spec("expect_column_to_exist", column="mass", column_index=1),
    spec("expect_column_to_exist", column="weight"),
    spec("expect_table_columns_to_match_ordered_list", column_list=COLUMNS),
    spec("expect_table_column_count_to_equal", value=4),
    spec("expect_column_values_to_be_unique", column="year"),
    spec("expect_column_mean_to_be_between", column="mass", min_value=0, max_value=10),
    spec("expect_column_values_to_be_in_type_list", column="mass", type_list=["float64"]),
    spec("expect_column_values_to_be_in_type_list", column="year", type_list=["int64"]),
    spec("expect_column_values_to_be_in_set", column="island", value_set=["x", "y"], mostly=0.9),
    spec("expect_column_values_to_match_regex", column="sex", regex="^(m|f)$"),
    spec("expect_column_values_to_not_be_null", column="island"),
    spec("expect_column_values_to_be_increasing", column="mass"),
    spec("expect_column_pair_values_a_to_be_greater_than_b", column_A="mass", column_B="year", or_equal=True),
    spec("expect_select_column_values_to_be_unique_within_record", column_list=["island", "sex"]),
    spec("expect_column_values_to_be_between", column="mass", min_value=0, max_value=5,
         row_condition='label=="a"', condition_parser="pandas"),
    spec("expect_column_values_to_not_be_null", column="gone"),
]


def frame(n: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    year = pd.array(rng.integers(2000, 2010, n), dtype="Int64")
    year[5] = pd.NA  # an integer column with a null reads as float64, whole or alone
    return pd.DataFrame({
        "label": rng.choice(["a", "b", "c"], n),
        "mass": np.round(rng.normal(4, 2, n), 2),
        "island": rng.choice(["x", "y", "z", None], n, p=[0.5, 0.3, 0.1, 0.1]),
        "sex": rng.choice(["m", "f", "?"], n, p=[0.5, 0.45, 0.05]),
        "year": year,
    })


def test_each_expectation_reads_only_what_it_needs():
    plan = plan_reads([*SUITE, spec("expect_table_row_count_to_equal_other_table", other_table_name="t")], COLUMNS)
    reads = {i: read for read, indices in plan.items() for i in indices}
    assert reads[0] == Read(())  # the row count: an index, no column
    assert reads[1] == reads[3] == reads[4] == Read((), rows="none")  # names and order: no row
    assert reads[5] == Read(("year",))
    assert reads[6] == reads[7] == reads[12] == Read(("mass",))  # one read serves every check on the column
    assert reads[13] == Read(("mass", "year"))
    assert reads[14] == Read(("island", "sex"))
    assert reads[15] == Read(("label", "mass"))  # the row condition's column too
    assert reads[16] == Read(())  # not in the data: GX reports it missing
    assert reads[len(SUITE)] == Read((), whole=True)  # on the table, not known: everything
    assert all(len(read.columns) <= 2 for read in plan)
    assert list(plan_reads(SUITE, COLUMNS, whole=True)) == [Read((), whole=True)]


def outcomes(result) -> list[dict]:
    return [expectation_report(r) for r in result.results]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("snap") / "snapshot.parquet"
    frame().to_parquet(path, index=False, row_group_size=64)
    return path


def test_reading_by_columns_gives_the_whole_frame_report(snapshot, tmp_path):
    whole = run_suite(snapshot, SUITE, tmp_path / "whole")
    by_columns = run_suite(snapshot, SUITE, tmp_path / "columns", whole_frame_bytes=0)

    assert outcomes(by_columns) == outcomes(whole)
    got = {(o["type"], o["kwargs"].get("column"), o["kwargs"].get("column_index")): o for o in outcomes(by_columns)}
    # The suite exercises both outcomes, so equal reports are not equal by being empty.
    assert [o["success"] for o in outcomes(by_columns)].count(False) >= 6
    assert got[("expect_column_to_exist", "mass", 1)]["success"]
    assert not got[("expect_column_to_exist", "weight", None)]["success"]
    z = int(frame()["island"].eq("z").sum())
    assert got[("expect_column_values_to_be_in_set", "island", None)]["unexpected_count"] == z > 0
    assert got[("expect_table_row_count_to_be_between", None, None)]["observed_value"] == 300
    assert got[("expect_column_values_to_not_be_null", "gone", None)]["error"]
    assert not got[("expect_column_values_to_be_in_type_list", "year", None)]["success"]  # float64: it has a null
    assert dict(by_columns.statistics) == dict(whole.statistics) and by_columns.success is whole.success is False


def test_the_merged_result_is_one_data_docs_page(snapshot, tmp_path):
    docs = tmp_path / "docs"
    run_suite(snapshot, SUITE, docs, whole_frame_bytes=0)

    pages = list((docs / "validations").rglob("*.html"))
    assert len(pages) == 1
    text = pages[0].read_text()
    assert "expect_column_values_to_be_unique" in text or "values must be unique" in text
    assert (docs / "index.html").is_file()
    stored = json.dumps([str(p) for p in pages])
    assert "data_quality" in stored
