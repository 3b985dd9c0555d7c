"""A hostile pipelines folder (an alias bomb, a spec named like a platform DAG) is parsed within Airflow's import
timeout, each bad file is named by the error DAG file, and the valid pipelines still become DAGs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
sys.path.insert(0, str(REPO / "tests" / "unit"))
from test_spec_limits import bomb_in_kwargs, bomb_in_tags  # noqa: E402

#: Airflow's default ``core.dagbag_import_timeout``: past it, a DAG file's every DAG disappears.
AIRFLOW_IMPORT_TIMEOUT_S = 30.0

_BAG = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
t = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - t, "dag_ids": sorted(bag.dag_ids),
                  "errors": bag.import_errors,
                  "champion_tags": sorted(bag.dags["kiln_champion"].tags) if "kiln_champion" in bag.dags else None}))
"""


def _dagbag(pipelines: Path) -> dict:
    """Parse kiln's DAG folder against ``pipelines`` in a fresh process (today's code: minutes, gigabytes)."""
    env = {**os.environ, "KILN_PIPELINES_DIR": str(pipelines), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _BAG, str(DAGS)], env=env, capture_output=True, text=True,
                          timeout=150, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(200)
def test_bombs_and_reserved_names_are_named_and_hide_nothing(tmp_path: Path) -> None:
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "good.yaml").write_text((DAGS / "pipelines" / "penguins_species.yaml").read_text())
    (pipelines / "bomb_valid.yaml").write_text(bomb_in_kwargs("bomb_valid"))
    (pipelines / "bomb_invalid.yaml").write_text(bomb_in_tags("bomb_invalid"))
    (pipelines / "champion.yaml").write_text("name: kiln_champion\nsource: {uri: data.csv}\ntarget: y\n"
                                             "task: classification\n")
    start = time.perf_counter()
    bag = _dagbag(pipelines)
    assert time.perf_counter() - start < 150
    assert bag["seconds"] < AIRFLOW_IMPORT_TIMEOUT_S
    assert bag["dag_ids"] == ["kiln_champion", "penguins_species", "penguins_species_monitor",
                              "penguins_species_score"]
    assert "registry" in bag["champion_tags"]  # the platform's DAG, not the impostor
    assert list(bag["errors"]) == [str(DAGS / "kiln_spec_errors.py")]
    message = next(iter(bag["errors"].values()))
    for name in ("bomb_valid.yaml", "bomb_invalid.yaml", "champion.yaml"):
        assert name in message
    assert "max_nodes" in message and "reserved" in message


def test_every_platform_dag_id_is_a_reserved_pipeline_name(tmp_path: Path) -> None:
    """Whatever DAGs kiln itself defines (with no pipelines at all), no spec may take their ids."""
    from kiln.tasks.spec import SpecError, parse_spec

    (tmp_path / "empty").mkdir()
    platform = _dagbag(tmp_path / "empty")["dag_ids"]
    assert "kiln_champion" in platform
    for dag_id in platform:
        with pytest.raises(SpecError, match="reserved"):
            parse_spec({"name": dag_id, "source": {"uri": "/x.csv"}, "target": "y", "task": "regression"}, "t")
    for stem in (p.stem for p in DAGS.glob("*.py")):  # the DAG files' names too (kiln_spec_errors has no DAG)
        with pytest.raises(SpecError, match="reserved"):
            parse_spec({"name": stem, "source": {"uri": "/x.csv"}, "target": "y", "task": "regression"}, "t")
