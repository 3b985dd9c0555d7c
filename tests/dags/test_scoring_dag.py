"""Every pipeline gets a ``<pipeline>_score`` DAG: prepare >> validate >> partition >> score (mapped, leased, at most
``scoring.parallel`` at once) >> commit (emitting the scores Asset), triggered only, documented, owned and retried,
with Params generated from the spec; a scoring DAG whose id is another DAG's is left out."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
SPEC = DAGS / "pipelines" / "penguins_species.yaml"


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def _factory():
    sys.path.insert(0, str(DAGS))
    try:
        import kiln_pipelines
    finally:
        sys.path.remove(str(DAGS))
    return kiln_pipelines


@pytest.mark.parametrize("spec_file", sorted(p.name for p in (DAGS / "pipelines").glob("*.yaml")))
def test_every_pipeline_has_a_scoring_dag_that_is_documented_owned_and_retried(dagbag, spec_file: str) -> None:
    from kiln.tasks.spec import load_spec

    spec = load_spec(DAGS / "pipelines" / spec_file)
    dag = dagbag.dags[f"{spec.name}_score"]
    assert dag.doc_md and {"kiln", "scoring"} <= set(dag.tags)
    assert type(dag.timetable).__name__ == "NullTimetable" and dag.catchup is False
    assert [t.task_id for t in dag.topological_sort()] == ["prepare", "validate", "partition", "score", "commit"]
    assert dag.task_dict["score"].max_active_tis_per_dagrun == spec.scoring.parallel
    assert [a.uri for a in dag.task_dict["commit"].outlets] == [f"kiln://{spec.name}/scores"]
    for t in dag.tasks:
        assert t.owner == spec.owner and t.retries >= 1, t.task_id
    assert set(dag.params.keys()) == {"input", "version", "partition_rows", "output"}
    assert dag.params["partition_rows"] == spec.scoring.partition_rows
    assert dag.params["version"] == "champion" and dag.params["output"] == f"{spec.name}/scores"


def test_the_params_refuse_what_the_spec_refuses(dagbag) -> None:
    from airflow.sdk.definitions.param import ParamsDict

    params = ParamsDict(dict(dagbag.dags["penguins_species_score"].params.items()))
    for bad in ({"partition_rows": 10}, {"version": "latest"}, {"input": "not-an-object"}):
        with pytest.raises(Exception, match=next(iter(bad))):
            trial = ParamsDict(dict(params.items()))
            trial.update(bad)
            trial.validate()


def test_a_scoring_dag_whose_id_is_another_pipeline_is_left_out(tmp_path: Path, monkeypatch, caplog) -> None:
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    data = yaml.safe_load(SPEC.read_text())
    (pipelines / "penguins_species.yaml").write_text(yaml.safe_dump(data))
    (pipelines / "clash.yaml").write_text(yaml.safe_dump({**data, "name": "penguins_species_score",
                                                          "monitoring": None}))
    monkeypatch.setenv("KILN_PIPELINES_DIR", str(pipelines))
    dags = runpy.run_path(str(DAGS / "kiln_pipelines.py"))
    assert dags["penguins_species_score"].get_task("ingest")  # the pipeline of that name, not a scoring DAG
    assert "its DAG id penguins_species_score is the id of another DAG" in caplog.text
    assert "penguins_species_score_score" in dags  # the clashing pipeline still gets its own


def test_the_factory_builds_a_scoring_dag_from_a_spec_s_scoring_section(tmp_path: Path) -> None:
    from kiln.tasks.spec import load_spec

    data = yaml.safe_load(SPEC.read_text())
    data["scoring"] = {"parallel": 5, "partition_rows": 50_000, "cpus": 2}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    dag = _factory().build_scoring_dag(load_spec(path), path)
    assert dag.dag_id == "penguins_species_score"
    assert dag.task_dict["score"].max_active_tis_per_dagrun == 5 and dag.params["partition_rows"] == 50_000
    assert "at most 5 at once, each on 2 leased core(s)" in dag.doc_md
