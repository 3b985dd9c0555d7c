"""Streaming data steps: ``clean`` and ``build_features`` give the same files whether a table is read in one batch
or in many small ones spanning several row groups, and a training rank's shard holds only its rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kiln.tasks.features import batches
from kiln.tasks.features.splits import TEST_RAW_FILE, TRAIN_FILE, load_shard, load_split
from kiln.tasks.pipeline.keys import CLEAN_FILE, CLEAN_REPORT_FILE, SNAPSHOT_FILE
from kiln.tasks.spec import CleaningSpec, FeaturesSpec
from kiln.tasks.steps.build_features import BuildFeaturesConfig, run_build_features
from kiln.tasks.steps.clean import CleanConfig, run_clean

FEATURE_FILES = ("train.parquet", "val.parquet", "test.parquet", TEST_RAW_FILE)


def raw_table(n: int = 1200) -> pd.DataFrame:
    """Every kind of column whose coercion depends on the whole column, duplicates across row groups, missing
    targets and outliers."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "id": pd.array(np.arange(n), dtype="Int64"),
        "a": np.where(rng.random(n) < .1, np.nan, rng.normal(size=n)),
        "count": rng.integers(0, 5, n),
        "c": np.where(rng.random(n) < .1, None, rng.integers(0, 3, n).astype(str)).astype(object),
        "text": np.where(rng.random(n) < .05, "oops", rng.integers(0, 9, n).astype(str)).astype(object),
        "year": np.where(rng.random(n) < .1, np.nan, rng.integers(2000, 2005, n).astype(float)),
        "big": np.where(rng.random(n) < .1, np.nan, rng.lognormal(size=n) * 100),
        "label": np.where(rng.random(n) < .03, None, rng.choice(["x", "y", "z"], n)).astype(object),
    })
    df.loc[5, "id"] = pd.NA  # an integer column with one null, in the first row group only
    return pd.concat([df, df.iloc[:150]], ignore_index=True)  # repeats, in later row groups


CLEANING = {"columns": {"a": {"missing": "mean", "outliers": "clip_iqr"},
                        "big": {"missing": "median", "outliers": "drop_iqr"},
                        "year": {"missing": "mode"}, "c": {"missing": "mode"}, "count": {"outliers": "clip_iqr"}}}


def run_both(tmp_path: Path, batch_rows: int, group_rows: int) -> Path:
    out = tmp_path / f"b{batch_rows}"
    for name in ("snap", "clean", "features"):
        (out / name).mkdir(parents=True)
    raw_table().to_parquet(out / "snap" / SNAPSHOT_FILE, index=False, row_group_size=250)
    config = CleanConfig(target="label", task="classification", columns={"year": "categorical", "text": "numeric"},
                         cleaning=CleaningSpec.model_validate(CLEANING))
    run_clean(config, out / "snap", out / "clean", batch_rows=batch_rows)
    features = BuildFeaturesConfig(target="label", task="classification",
                                   features=FeaturesSpec.model_validate({"max_categories": 2}), seed=3)
    run_build_features(features, out / "clean", out / "features", batch_rows=batch_rows, group_rows=group_rows)
    return out


@pytest.fixture(scope="module")
def streamed(tmp_path_factory) -> Path:
    """The table cleaned and split in batches of 97 rows, split files in row groups of 128 rows."""
    return run_both(tmp_path_factory.mktemp("streamed"), 97, 128)


def test_many_small_batches_give_the_files_of_one_batch(tmp_path, streamed):
    whole = run_both(tmp_path, 1_000_000, 1_000_000)

    for name in (f"clean/{CLEAN_FILE}", *(f"features/{f}" for f in FEATURE_FILES)):
        pd.testing.assert_frame_equal(pd.read_parquet(whole / name), pd.read_parquet(streamed / name),
                                      check_exact=True, obj=name)
    for name in (f"clean/{CLEAN_REPORT_FILE}", "features/feature_spec.json"):
        assert json.loads((whole / name).read_text()) == json.loads((streamed / name).read_text()), name
    report = json.loads((streamed / "clean" / CLEAN_REPORT_FILE).read_text())
    assert {r["rule"] for r in report["rules"]} >= {"drop_duplicates", "coerce_numeric", "outliers_drop_iqr",
                                                     "missing_mode", "outliers_clip_iqr"}
    assert pq.ParquetFile(streamed / "features" / TRAIN_FILE).metadata.num_row_groups > 1


def test_a_batch_converts_to_the_whole_files_dtypes(tmp_path):
    path = tmp_path / "t.parquet"
    # An integer column with a null in its first row group only, written without pandas metadata (as ingest does).
    pq.write_table(pa.table({"n": pa.array([1, None, 3, 4], pa.int64())}), path, row_group_size=2)
    pf = pq.ParquetFile(path)
    frames = [frame for _, frame in batches.iter_frames(pf, batch_rows=2)]
    assert [f["n"].dtype for f in frames] == [pd.read_parquet(path)["n"].dtype] * 2 == ["float64"] * 2


@pytest.mark.parametrize("world_size", [1, 2, 3], ids=["one-rank", "two-ranks", "three-ranks"])
def test_each_rank_reads_only_its_rows(streamed, monkeypatch, world_size):
    features = streamed / "features"
    x_all, y_all = load_split(features, "train")
    groups_read: list[int] = []
    read_row_group = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: groups_read.append(i) or read_row_group(self, i, *a, **k))

    shards = []
    for rank in range(world_size):
        groups_read.clear()
        x, y, total = load_shard(features, "train", rank, world_size)
        start, stop = batches.shard_range(total, rank, world_size)
        assert total == len(x_all) and len(x) == stop - start
        np.testing.assert_array_equal(x, x_all[start:stop])
        np.testing.assert_array_equal(y, y_all[start:stop])
        assert set(groups_read) == set(range(start // 128, (stop - 1) // 128 + 1))  # only the groups it needs
        shards.append(len(x))
    assert sum(shards) == len(x_all) and max(shards) - min(shards) <= 1
