"""Spec loading: the shipped specs are valid, and every kind of bad spec is named precisely."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kiln.tasks.spec import PARAM_FIELDS, SpecError, load_spec, load_specs, parse_spec

REPO = Path(__file__).resolve().parents[2]
PIPELINES = REPO / "dags" / "pipelines"
MINIMAL = {"name": "m", "source": {"uri": "/data/x.csv"}, "target": "y", "task": "classification"}


@pytest.mark.parametrize("name", ["penguins_species", "digits_cnn", "penguins_resmlp"])
def test_shipped_specs_are_valid(name: str) -> None:
    spec = load_spec(PIPELINES / f"{name}.yaml")
    assert spec.name == name
    assert len(spec.spec_hash()) == 64


def test_minimal_spec_gets_defaults() -> None:
    spec = parse_spec(MINIMAL, "m.yaml")
    assert spec.training.epochs == 10 and spec.model.type == "mlp" and spec.primary_metric == "accuracy"
    assert spec.source.resolved_format() == "csv"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"task": "clasification"}, ["field 'task'", "'classification' or 'regression'", '"clasification"']),
        ({"trainig": {}}, ["unknown field 'trainig'", "did you mean 'training'"]),
        ({"training": {"epochs": 0}}, ["field 'training.epochs'", "greater than or equal to 1", "(found 0)"]),
        ({"training": {"bach_size": 8}}, ["field 'training.bach_size'", "did you mean 'batch_size'"]),
        ({"model": {"type": "cnn"}}, ["field 'model'", "image_shape"]),
        ({"evaluation": {"thresholds": {"rmse": 1.0}}}, ["metric 'rmse'", "allowed: accuracy"]),
        ({"columns": {"y": "ignore"}}, ["target column 'y'", "ignore"]),
        ({"name": "has space"}, ["field 'name'", "pattern"]),
        ({"target": None}, ["field 'target'"]),
        ({"features": {"test_fraction": 0.5, "val_fraction": 0.45}}, ["field 'features'", "below 0.9"]),
        ({"training": {"nodes": 2}}, ["field 'training'", "launcher 'local' runs on one node",
                                      "set training.launcher: docker"]),
        ({"training": {"launcher": "k8s"}}, ["field 'training.launcher'", "'local' or 'docker'"]),
        ({"training": {"resources": {"memory": "lots"}}}, ["field 'training.resources.memory'", "16GiB"]),
        ({"training": {"resources": {"gpu": 1}}}, ["field 'training.resources.gpu'", "did you mean 'gpus'"]),
        ({"training": {"nproc": 2, "resources": {"gpus": 1}}}, ["field 'training'", "one rank per GPU",
                                                                "set nproc to at most"]),
        ({"model": {"type": "custom"}}, ["field 'model'", "needs factory", "'module.path:callable'"]),
        ({"model": {"factory": "resmlp:build"}}, ["field 'model'", "only used with model.type 'custom'",
                                                  "set type: custom"]),
        ({"model": {"type": "custom", "factory": "m:f", "hidden_sizes": [8]}},
         ["model.hidden_sizes is a setting of the built-in networks", "model.options"]),
        ({"model": {"type": "custom", "factory": "resmlp/build"}}, ["field 'model.factory'", "'module.path:callable'"]),
        ({"model": {"type": "custom", "factory": "m:f", "options": {"n_outputs": 3}}},
         ["field 'model.options'", "'n_outputs' is passed by kiln"]),
        ({"model": {"type": "custom", "factory": "m:f", "options": {"w": [[[[[1]]]]]}}},
         ["field 'model.options'", "deeper than 4"]),
        ({"model": {"type": "custom", "factory": "m:f", "options": {"w": list(range(300))}}},
         ["field 'model.options'", "more than 256 values"]),
        ({"training": {"params": {"my key": 1}}}, ["field 'training.params'", "not a Python identifier"]),
        ({"training": {"params": {"epochs": 3}}}, ["field 'training.params'", "set training.epochs instead"]),
        ({"training": {"entrypoint": "loop.py:train"}}, ["training.entrypoint 'loop.py:train' names a file",
                                                         "set code.path"]),
        ({"code": {"requirements": ["tabulate=0.9"]}}, ["field 'code.requirements'", "not a PEP 508",
                                                         "tabulate==0.9.0"]),
    ],
    ids=["bad-choice", "misspelled-section", "out-of-range", "misspelled-field", "cnn-without-shape",
         "metric-for-other-task", "ignored-target", "bad-name", "null-target", "no-train-rows",
         "multi-node-local", "unknown-launcher", "bad-memory-size", "misspelled-resource", "more-ranks-than-gpus",
         "custom-without-factory", "factory-with-mlp", "custom-with-builtin-field", "factory-not-a-ref",
         "option-kiln-passes", "options-too-deep", "options-too-many", "param-not-identifier", "param-shadows-field",
         "file-entrypoint-without-code", "bad-requirement"],
)
def test_bad_spec_names_the_field(change: dict, expected: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({**MINIMAL, **change}, "bad.yaml")
    message = str(info.value)
    assert "bad.yaml" in message
    for part in expected:
        assert part in message


def test_missing_required_fields_all_listed() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({"name": "x"}, "f.yaml")
    for field in ("source", "target", "task"):
        assert f"field '{field}': required but missing" in str(info.value)


@pytest.mark.parametrize(("content", "expected"), [("name: [unclosed", "not valid YAML"),
                                                  ("- a\n- b\n", "must be a mapping")], ids=["yaml", "list"])
def test_unparseable_file(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(content)
    with pytest.raises(SpecError, match=expected):
        load_spec(path)


def test_unreadable_file_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"(?s)nope.yaml.*cannot read"):
        load_spec(tmp_path / "nope.yaml")


def test_relative_source_resolved_against_spec_folder(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({**MINIMAL, "source": {"uri": "data/x.parquet"}}))
    spec = load_spec(tmp_path / "p.yaml")
    assert spec.source.uri == str(tmp_path / "data" / "x.parquet")
    assert spec.source.resolved_format() == "parquet"


def test_code_path_resolved_against_spec_folder_or_defaulted_to_the_pipeline_folder(tmp_path: Path) -> None:
    custom = {**MINIMAL, "source": {"uri": "x.csv"}, "model": {"type": "custom", "factory": "net:build",
                                                                "options": {"width": 8}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(custom))
    assert load_spec(tmp_path / "p.yaml").code.path is None  # no folder named as the pipeline: an installed package
    (tmp_path / "m").mkdir()
    spec = load_spec(tmp_path / "p.yaml")
    assert spec.code.path == str(tmp_path / "m")
    assert spec.with_overrides({"epochs": 2}).model == spec.model  # a dumped custom model validates again
    (tmp_path / "src").mkdir()
    (tmp_path / "q.yaml").write_text(yaml.safe_dump({**custom, "code": {"path": "src", "requirements": ["six"]}}))
    assert load_spec(tmp_path / "q.yaml").code.path == str(tmp_path / "src")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**custom, "code": {"path": "nowhere"}}))
    with pytest.raises(SpecError, match=r"field 'code.path': 'nowhere' is not a folder"):
        load_spec(tmp_path / "r.yaml")


def test_overrides_apply_and_validate() -> None:
    spec = parse_spec(MINIMAL, "m.yaml")
    new = spec.with_overrides({"epochs": 3, "learning_rate": 0.1, "sample_fraction": 0.5, "seed": None})
    assert (new.training.epochs, new.training.learning_rate, new.sample_fraction) == (3, 0.1, 0.5)
    assert new.training.seed == spec.training.seed  # None means "keep the spec's value"
    assert spec.training.epochs == 10  # the original is untouched
    with pytest.raises(SpecError, match="training.epochs"):
        spec.with_overrides({"epochs": -1})
    with pytest.raises(SpecError, match="unknown field 'epoch'.*did you mean 'epochs'"):
        spec.with_overrides({"epoch": 3})
    assert set(PARAM_FIELDS) == {"epochs", "learning_rate", "batch_size", "seed", "nproc", "nodes", "launcher",
                                 "sample_fraction", "deployment", "use_cache", "tuning_trials", "tuning_parallel"}
    assert spec.with_overrides({"deployment": "canary"}).deployment.strategy == "canary"
    with pytest.raises(SpecError, match="deployment.strategy"):
        spec.with_overrides({"deployment": "blue-green"})


@pytest.mark.parametrize(("section", "field"), [
    ({"evaluation": {"gate": {"slices": [{"column": "x", "thresholds": {"rmse": 1.0}}]}}}, "rmse"),
    ({"evaluation": {"gate": {"margin": -0.1}}}, "evaluation.gate.margin"),
    ({"evaluation": {"gate": {"method": "bayes"}}}, "evaluation.gate.method"),
    ({"deployment": {"canary": {"share": 1.5}}}, "deployment.canary.share"),
    ({"deployment": {"port": 70000}}, "deployment.port"),
], ids=["slice-metric-of-other-task", "negative-margin", "unknown-method", "share-above-one", "port-out-of-range"])
def test_gate_and_deployment_sections_are_validated(section: dict, field: str) -> None:
    with pytest.raises(SpecError, match=field):
        parse_spec({**MINIMAL, **section}, "t.yaml")


def test_load_specs_keeps_valid_ones_and_reports_duplicates(tmp_path: Path) -> None:
    local = {**MINIMAL, "source": {"uri": "x.csv"}}  # next to the spec: inside the data roots
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(local))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(local))  # same name as a.yaml
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**local, "name": "c", "task": "nope"}))
    (tmp_path / "_draft.yaml").write_text("not: [valid")
    valid, errors = load_specs(tmp_path)
    assert [s.name for _, s in valid] == ["m"]
    assert [Path(e.source).name for e in errors] == ["b.yaml", "c.yaml"]
    assert "already used by" in str(errors[0])


def test_spec_hash_is_canonical() -> None:
    a = parse_spec(MINIMAL, "a")
    b = parse_spec(dict(reversed(list(MINIMAL.items()))), "b")
    assert a.spec_hash() == b.spec_hash()
    assert a.spec_hash() != a.with_overrides({"epochs": 11}).spec_hash()


@pytest.mark.parametrize("name", ["kiln_champion", "kiln_spec_errors", "kiln_pipelines", "KILN_Champion",
                                  "kiln_anything_new", "kiln"])
def test_platform_dag_names_are_reserved(name: str) -> None:
    """A spec named like a platform DAG would silently replace it (same DAG id): refused, naming the field."""
    with pytest.raises(SpecError) as info:
        parse_spec({**MINIMAL, "name": name}, "r.yaml")
    message = str(info.value)
    assert "field 'name'" in message and "reserved" in message and name in message
    assert "rename the pipeline" in message


def test_names_that_merely_mention_kiln_are_fine() -> None:
    assert parse_spec({**MINIMAL, "name": "kilnfired_pots"}, "k.yaml").name == "kilnfired_pots"
