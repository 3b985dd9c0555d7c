"""Batch scoring's settings and partitions: every bad Param is refused naming it and the fix, partitions cover the
input's rows in order, and a partition is read from the row groups that hold it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from kiln.tasks.scoring.config import ScoreConfig, ScoringError, output_key, part_key, work_key
from kiln.tasks.scoring.partition import Partition, plan_partitions, read_partition
from kiln.tasks.spec import load_spec

REPO = Path(__file__).resolve().parents[2]


def _spec(tmp_path: Path, **scoring: object):
    data = yaml.safe_load((REPO / "dags" / "pipelines" / "penguins_species.yaml").read_text())
    data["scoring"] = scoring
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_spec(path), path


def test_params_default_to_the_spec_and_the_champion(tmp_path: Path) -> None:
    spec, path = _spec(tmp_path, partition_rows=5000, id_column="id")
    _, config = ScoreConfig.load(path, {"version": None})
    assert (config.version, config.partition_rows, config.id_column) == ("champion", 5000, "id")
    assert config.output == "penguins_species/scores" and config.source == spec.source
    assert work_key("p", "manual__2026-01-01T00:00:00+00:00") == "p/_scoring/manual__2026-01-01T00_00_00_00_00"
    assert part_key("p", "r1", 7) == "p/_scoring/r1/parts/00007"
    assert output_key(config, "r1") == "penguins_species/scores/r1"


def test_an_input_param_is_a_source_checked_like_the_spec_s(tmp_path: Path) -> None:
    spec, _ = _spec(tmp_path)
    (tmp_path / "batch.csv").write_text("a\n1\n")
    config = ScoreConfig.from_spec(spec, {"input": "batch.csv"}, tmp_path)
    assert config.source.uri == str(tmp_path / "batch.csv")
    sql = ScoreConfig.from_spec(spec, {"input": {"sql": {"conn_id": "warehouse", "query": "select 1"}}}, tmp_path)
    assert sql.source.kind == "sql" and sql.describe_input() == "sql://warehouse: select 1"


@pytest.mark.parametrize(("params", "named", "fix"), [
    ({"version": "latest"}, "Param 'version'", "'champion' or a registered version number"),
    ({"version": "0"}, "Param 'version'", "'champion' or a registered version number"),
    ({"partition_rows": 5}, "partition_rows", "within the bounds"),
    ({"partition_rows": "many"}, "Param 'partition_rows'", "whole number"),
    ({"output": "other_pipeline/scores"}, "Param 'output'", "under 'penguins_species/'"),
    ({"output": "penguins_species/_scoring"}, "Param 'output'", "does not start with '_'"),
    ({"output": "penguins_species/../x"}, "Param 'output'", "invalid artifact key"),
    ({"input": 3}, "Param 'input'", "source section"),
    ({"input": {"uri": "a.csv", "sql": {"conn_id": "c", "query": "q"}}}, "Param 'input'", "exactly one"),
    ({"input": {"uri": "a.csv", "watch": {}}}, "Param 'input'", "remove them"),
    ({"input": "/etc/passwd"}, "Param 'input'", "outside the data roots"),
    ({"input": {"uri": "a.csv", "delimiter": ";"}}, "input.delimiter", "Extra inputs"),
], ids=["unknown-word", "zero", "rows-below-bound", "rows-not-int", "other-pipeline", "kiln-folder", "dot-dot",
        "not-a-section", "two-sources", "watch", "outside-roots", "unknown-field"])
def test_bad_params_are_refused_naming_the_param_and_the_fix(tmp_path: Path, params: dict, named: str,
                                                             fix: str) -> None:
    spec, _ = _spec(tmp_path)
    with pytest.raises(ScoringError) as caught:
        ScoreConfig.from_spec(spec, params, tmp_path)
    assert named in str(caught.value) and fix in str(caught.value)


def test_an_id_column_that_is_the_target_or_bad_bounds_fail_the_spec(tmp_path: Path) -> None:
    from kiln.tasks.spec import SpecError

    with pytest.raises(SpecError, match="scoring.partition_rows"):
        _spec(tmp_path, partition_rows=10)
    with pytest.raises(SpecError, match="scoring.memory"):
        _spec(tmp_path, memory="lots")
    with pytest.raises(SpecError, match="scoring.id_column 'species' is the target"):
        _spec(tmp_path, id_column="species")


def test_partitions_cover_the_rows_in_order() -> None:
    parts = plan_partitions(2500, 1000)
    assert [(p.index, p.start, p.stop) for p in parts] == [(0, 0, 1000), (1, 1000, 2000), (2, 2000, 2500)]
    assert sum(p.rows for p in parts) == 2500
    assert Partition.from_dict(parts[2].to_dict()) == parts[2]
    with pytest.raises(ValueError, match="not a partition"):
        Partition.from_dict({"index": 0, "start": 5, "stop": 5})


def test_too_many_partitions_name_the_least_partition_rows_that_fits() -> None:
    with pytest.raises(ScoringError, match=r"Param 'partition_rows'.*give at least 10000"):
        plan_partitions(10_000_000, 5_000)
    with pytest.raises(ScoringError, match="no rows"):
        plan_partitions(0, 1000)


def test_a_partition_is_read_from_the_row_groups_that_hold_it(tmp_path: Path) -> None:
    df = pd.DataFrame({"a": np.arange(1000, dtype=np.float64), "b": [f"s{i}" for i in range(1000)],
                       "unused": np.zeros(1000)})
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "x.parquet", row_group_size=100)
    table = read_partition(tmp_path / "x.parquet", Partition(3, 150, 420), ["b", "a"])
    assert table.column_names == ["b", "a"] and table.num_rows == 270
    assert table["a"].to_pylist() == list(range(150, 420))
    with pytest.raises(ScoringError, match="has 1000"):
        read_partition(tmp_path / "x.parquet", Partition(0, 900, 1100), ["a"])
