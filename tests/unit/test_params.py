"""Trigger-time Params come from the spec fields they override: one declaration of each bound and description."""

from __future__ import annotations

import pytest

from kiln.tasks.settings import REPO_ROOT
from kiln.tasks.spec import PARAM_FIELDS, load_spec
from kiln.tasks.spec import pipeline as spec_pipeline
from kiln.tasks.spec.params import param_schemas

SPEC = load_spec(REPO_ROOT / "dags" / "pipelines" / "penguins_species.yaml")


@pytest.mark.parametrize(("name", "expected"), [
    ("epochs", {"default": SPEC.training.epochs, "type": "integer", "minimum": 1, "maximum": 10_000,
                "title": "Epochs", "description_md": "Passes over the training split."}),
    ("learning_rate", {"default": SPEC.training.learning_rate, "type": "number", "exclusiveMinimum": 0,
                       "maximum": 10, "title": "Learning rate", "description_md": "Step size of the optimizer."}),
    ("launcher", {"default": "local", "type": "string", "enum": ["local", "docker"], "title": "Launcher"}),
    ("sample_fraction", {"default": 1.0, "type": "number", "exclusiveMinimum": 0, "maximum": 1,
                         "title": "Sample fraction"}),
    ("deployment", {"default": "direct", "type": "string", "enum": ["direct", "canary", "none"],
                    "title": "Deployment"}),
], ids=["epochs", "learning_rate", "launcher", "sample_fraction", "deployment"])
def test_each_param_takes_its_field_s_bounds_choices_and_docs(name: str, expected: dict) -> None:
    schema = param_schemas(SPEC)[name]
    assert schema == {**schema, **expected}
    assert schema["description_md"] and "``" not in schema["description_md"], "Markdown, not reStructuredText"


def test_the_defaults_are_this_spec_s_values() -> None:
    changed = SPEC.with_overrides({"epochs": 7, "nproc": 1, "deployment": "canary"})
    schemas = param_schemas(changed)
    assert (schemas["epochs"]["default"], schemas["nproc"]["default"], schemas["deployment"]["default"]) == \
        (7, 1, "canary")
    assert set(schemas) == {name for name, path in PARAM_FIELDS.items() if path[0] != "tuning"}  # SPEC is not tuned


def test_tuning_params_apply_to_tuned_pipelines_only() -> None:
    from kiln.tasks.spec import SpecError, parse_spec

    tuned = parse_spec({**SPEC.model_dump(mode="json"), "tuning": {
        "space": {"training.learning_rate": {"type": "log_uniform", "low": 1e-4, "high": 0.1}}, "trials": 8}}, "t")
    assert param_schemas(tuned)["tuning_trials"] | {"default": 8, "minimum": 1, "maximum": 1000} == \
        param_schemas(tuned)["tuning_trials"]
    assert tuned.with_overrides({"tuning_trials": 3}).tuning.trials == 3
    assert (tuned.with_overrides({"tuning_trials": 1}).tuning.parallel, tuned.tuning.parallel) == (1, 2)
    with pytest.raises(SpecError, match="field 'tuning.trials' \\(Param 'tuning_trials'\\)"):
        tuned.with_overrides({"tuning_trials": 0})
    with pytest.raises(SpecError, match="Param 'tuning_trials': pipeline 'penguins_species' has no tuning section"):
        SPEC.with_overrides({"tuning_trials": 3})
    # Fewer trials at once than the DAG's limit (the spec's parallel), never more.
    assert param_schemas(tuned)["tuning_parallel"] | {"default": 2, "minimum": 1, "maximum": 2} == \
        param_schemas(tuned)["tuning_parallel"]
    assert tuned.with_overrides({"tuning_parallel": 1}).tuning.parallel == 1
    assert tuned.with_overrides({"tuning_trials": 1, "tuning_parallel": None}).tuning.parallel == 1
    with pytest.raises(SpecError, match="Param 'tuning_parallel': 3 trials at once is more than the spec's "
                                        "tuning.parallel \\(2\\)"):
        tuned.with_overrides({"tuning_parallel": 3})
    with pytest.raises(SpecError, match="parallel 2 is more than tuning.trials 1"):
        tuned.with_overrides({"tuning_trials": 1, "tuning_parallel": 2})


def test_a_new_tunable_field_is_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a field to PARAM_FIELDS is all it takes: its type, bounds and docs follow from the field."""
    monkeypatch.setitem(spec_pipeline.PARAM_FIELDS, "weight_decay", ("training", "weight_decay"))
    schema = param_schemas(SPEC)["weight_decay"]
    assert schema["type"] == "number" and schema["minimum"] == 0 and schema["default"] == 0.0
    assert schema["description_md"] == "L2 penalty of the optimizer."
    assert SPEC.with_overrides({"weight_decay": 0.01}).training.weight_decay == 0.01


NUMERIC = sorted(name for name, schema in param_schemas(SPEC).items() if schema["type"] in ("integer", "number"))


def test_every_numeric_param_is_bounded_both_ways() -> None:
    assert {"epochs", "learning_rate", "batch_size", "seed", "nproc", "nodes", "sample_fraction"} <= set(NUMERIC)
    for name in NUMERIC:
        schema = param_schemas(SPEC)[name]
        assert {"minimum", "exclusiveMinimum"} & set(schema), name
        assert {"maximum", "exclusiveMaximum"} & set(schema), name
        upper = schema.get("maximum", schema.get("exclusiveMaximum"))
        assert upper <= 2**63 - 1, name  # what an int64 (and Airflow's task supervisor) can hold
    assert param_schemas(SPEC)["seed"]["maximum"] == 2**32 - 1  # numpy's and scikit-learn's seed range


def _schema_problem(name: str, value: object) -> str | None:
    import jsonschema

    keywords = {k: v for k, v in param_schemas(SPEC)[name].items() if k not in ("default", "description_md")}
    try:
        jsonschema.validate(value, keywords)
    except jsonschema.ValidationError as exc:
        return exc.message
    return None


HOSTILE = [("seed", 10**30), ("seed", -1), ("learning_rate", float("nan")), ("learning_rate", float("inf")),
           ("sample_fraction", float("nan")), ("epochs", float("nan")), ("batch_size", float("inf")),
           ("nodes", 2**64)]
HOSTILE_IDS = ["seed-1e30", "seed-negative", "lr-nan", "lr-inf", "fraction-nan", "epochs-nan", "batch-inf",
               "nodes-2^64"]


@pytest.mark.parametrize(("name", "value"), HOSTILE, ids=HOSTILE_IDS)
def test_param_schema_refuses_out_of_range_and_non_finite(name: str, value: object) -> None:
    """The Param's JSON schema (what Airflow checks at trigger time) refuses the value: a NaN compares false with
    every bound, so a schema of bounds alone accepted it."""
    assert _schema_problem(name, value) is not None


@pytest.mark.parametrize("name", NUMERIC)
def test_param_schema_accepts_its_default(name: str) -> None:
    assert _schema_problem(name, param_schemas(SPEC)[name]["default"]) is None


@pytest.mark.parametrize(("name", "value"), HOSTILE, ids=HOSTILE_IDS)
def test_overrides_refuse_out_of_range_and_non_finite_naming_the_param(name: str, value: object) -> None:
    from kiln.tasks.spec import SpecError

    with pytest.raises(SpecError) as info:
        SPEC.with_overrides({name: value})
    message = str(info.value)
    assert ".".join(PARAM_FIELDS[name]) in message and f"Param '{name}'" in message


def test_kiln_run_refuses_hostile_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    """``kiln run --conf`` goes through the same check: one line naming the Param (JSON allows NaN literals)."""
    from kiln.tasks.cli.run import check_pipeline

    monkeypatch.setenv("KILN_PIPELINES_DIR", str(REPO_ROOT / "dags" / "pipelines"))
    assert check_pipeline("penguins_species", '{"epochs": 2}') is None
    problem = check_pipeline("penguins_species", '{"seed": 1000000000000000000000000000000}')
    assert problem and "training.seed" in problem and "Param 'seed'" in problem
    problem = check_pipeline("penguins_species", '{"learning_rate": NaN}')
    assert problem and "training.learning_rate" in problem
