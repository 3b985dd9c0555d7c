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
    assert set(schemas) == set(PARAM_FIELDS)


def test_a_new_tunable_field_is_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding a field to PARAM_FIELDS is all it takes: its type, bounds and docs follow from the field."""
    monkeypatch.setitem(spec_pipeline.PARAM_FIELDS, "weight_decay", ("training", "weight_decay"))
    schema = param_schemas(SPEC)["weight_decay"]
    assert schema["type"] == "number" and schema["minimum"] == 0 and schema["default"] == 0.0
    assert schema["description_md"] == "L2 penalty of the optimizer."
    assert SPEC.with_overrides({"weight_decay": 0.01}).training.weight_decay == 0.01
