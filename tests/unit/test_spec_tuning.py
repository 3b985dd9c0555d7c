"""The spec's ``tuning:`` section: a valid search parses with its defaults resolved from the pipeline, every bad
range, field, value or objective is refused at parse time naming the field, and a trial's values make a valid spec."""

from __future__ import annotations

import pytest
import torch
import yaml

from kiln.tasks.spec import ModelSpec, SpecError, TrainingSpec, parse_spec
from kiln.tasks.spec.tuning import NOT_TUNABLE, VAL_METRICS, tunable_fields
from kiln.tasks.training.loop import _evaluate
from kiln.tasks.tuning import apply_values

MINIMAL = {"name": "m", "source": {"uri": "/data/x.csv"}, "target": "y", "task": "classification"}
LR = {"training.learning_rate": {"type": "log_uniform", "low": 1.0e-4, "high": 0.1}}

#: The README's example (/tmp/work/readme_tuning.md holds the same text).
README_EXAMPLE = """
tuning:
  space:
    training.learning_rate: {type: log_uniform, low: 1.0e-4, high: 1.0e-1}
    training.batch_size: {type: int, low: 16, high: 128, step: 16}
    training.optimizer: {type: categorical, choices: [adam, sgd]}
    model.hidden_sizes: {type: categorical, choices: [[64, 32], [128, 64], [256]]}
    model.dropout: {type: uniform, low: 0.0, high: 0.5}
  objective: {metric: val/accuracy, direction: maximize}
  trials: 20
  parallel: 2
  sampler: tpe
  pruner: median
"""


def _parse(tuning: object, **fields: object):
    return parse_spec({**MINIMAL, **fields, "tuning": tuning}, "m.yaml")


def test_readme_example_parses_with_its_values() -> None:
    spec = _parse(yaml.safe_load(README_EXAMPLE)["tuning"])
    t = spec.tuning
    assert list(t.space) == ["training.learning_rate", "training.batch_size", "training.optimizer",
                             "model.hidden_sizes", "model.dropout"]
    assert t.space["model.hidden_sizes"].choices == [[64, 32], [128, 64], [256]]
    assert t.space["training.batch_size"].step == 16
    assert (t.trials, t.parallel, t.sampler, t.pruner) == (20, 2, "tpe", "median")
    assert (t.metric(spec), t.direction(spec), t.study_seed(spec)) == ("val/accuracy", "maximize", 42)


@pytest.mark.parametrize(("task", "metric", "direction"), [
    ("classification", "val/accuracy", "maximize"),
    ("regression", "val/rmse", "minimize"),
], ids=["classification", "regression"])
def test_defaults_follow_the_task_and_training_seed(task: str, metric: str, direction: str) -> None:
    spec = _parse({"space": LR}, task=task, training={"seed": 7})
    t = spec.tuning
    assert (t.metric(spec), t.direction(spec), t.study_seed(spec)) == (metric, direction, 7)
    assert (t.trials, t.parallel, t.sampler, t.pruner) == (20, 2, "tpe", "median")
    assert _parse({"space": LR, "objective": {"metric": "val/loss"}}, task=task).tuning.direction(spec) == "minimize"


def test_parallel_defaults_to_the_trials_when_fewer_than_two() -> None:
    assert _parse({"space": LR, "trials": 1}).tuning.parallel == 1


def test_spec_without_tuning_is_unchanged() -> None:
    spec = parse_spec(MINIMAL, "m.yaml")
    assert spec.tuning is None
    assert "tuning" not in {k for k, v in spec.model_dump().items() if v is not None}
    assert parse_spec(spec.model_dump(mode="json"), "again").spec_hash() == spec.spec_hash()


def test_own_loop_may_name_its_own_metric_with_a_direction() -> None:
    spec = _parse({"space": {"training.params.depth": {"type": "int", "low": 1, "high": 4}},
                   "objective": {"metric": "val/f1_weighted", "direction": "maximize"}},
                  training={"entrypoint": "loop:train"})
    assert spec.tuning.metric(spec) == "val/f1_weighted"
    custom = _parse({"space": {"model.options.width": {"type": "categorical", "choices": [32, 64]}}},
                    model={"type": "custom", "factory": "net:build"})
    assert custom.tuning.space["model.options.width"].choices == [32, 64]


BAD = [
    ({"space": {}}, ["field 'tuning.space'", "names no field"]),
    ({"space": {"training.lr": {"type": "uniform", "low": 0.1, "high": 1}}},
     ["field 'tuning.space'", "unknown field 'training.lr'", "training.learning_rate", "training.params.<name>"]),
    ({"space": {"training.nproc": {"type": "int", "low": 1, "high": 4}}},
     ["'training.nproc' cannot be tuned", "where a trial runs"]),
    ({"space": {"training.learning_rate": {"type": "uniform", "low": 0.1, "high": 0.01}}},
     ["field 'tuning.space.training.learning_rate'", "[0.1, 0.01] is inverted"]),
    ({"space": {"training.learning_rate": {"type": "uniform", "low": 0.1, "high": 0.1}}},
     ["field 'tuning.space.training.learning_rate'", "is empty"]),
    ({"space": {"training.batch_size": {"type": "int", "low": 64, "high": 16}}},
     ["field 'tuning.space.training.batch_size'", "inverted"]),
    ({"space": {"training.learning_rate": {"type": "log_uniform", "low": 0, "high": 0.1}}},
     ["field 'tuning.space.training.learning_rate'", "log_uniform needs low > 0"]),
    ({"space": {"training.learning_rate": {"type": "log_uniform", "low": 1.0e-3, "high": 20}}},
     ["tuning.space.training.learning_rate: high is refused by training.learning_rate", "less than or equal to 10"]),
    ({"space": {"model.dropout": {"type": "uniform", "low": 0.0, "high": 1.0}}},
     ["tuning.space.model.dropout: high is refused", "less than 1"]),
    ({"space": {"training.batch_size": {"type": "int", "low": 0, "high": 64}}},
     ["tuning.space.training.batch_size: low is refused", "greater than or equal to 1"]),
    ({"space": {"model.hidden_sizes": {"type": "categorical", "choices": [[64, 32], [0]]}}},
     ["tuning.space.model.hidden_sizes: choice [0] is refused", "integers from 1 to 65536"]),
    ({"space": {"training.optimizer": {"type": "categorical", "choices": ["adam", "rmsprop"]}}},
     ['tuning.space.training.optimizer: choice "rmsprop" is refused', "'adam' or 'sgd'"]),
    ({"space": {"model.options.width": {"type": "int", "low": 8, "high": 64}}},
     ["tuning.space.model.options.width", "only used with model.type 'custom'"]),
    ({"space": {"training.batch_size": {"type": "uniform", "low": 16, "high": 64}}},
     ["'training.batch_size' takes type int or categorical (found 'uniform')"]),
    ({"space": {"training.batch_size": {"type": "int", "low": 16, "high": 60, "step": 16}}},
     ["field 'tuning.space.training.batch_size'", "not a multiple of step 16"]),
    ({"space": {"training.epochs": {"type": "int", "low": 0, "high": 8, "log": True}}},
     ["field 'tuning.space.training.epochs'", "log: true needs low >= 1"]),
    ({"space": {"training.learning_rate": {"type": "uniform", "lo": 0.1, "high": 1}}},
     ["field 'tuning.space.training.learning_rate'", "unknown field 'lo'", "did you mean 'low'"]),
    ({"space": {"training.learning_rate": {"type": "normal", "low": 0.1, "high": 1}}},
     ["field 'tuning.space.training.learning_rate.type'", "'uniform', 'log_uniform', 'int' or 'categorical'"]),
    ({"space": {"training.optimizer": {"type": "categorical", "choices": ["adam"]}}},
     ["field 'tuning.space.training.optimizer'", "at least 2 choices"]),
    ({"space": {"training.optimizer": {"type": "categorical", "choices": ["adam", "adam"]}}},
     ["field 'tuning.space.training.optimizer'", 'choice "adam" is given twice']),
    ({"space": LR, "objective": {"metric": "val/rmse"}},
     ["tuning.objective.metric: 'val/rmse' is not logged for task 'classification'",
      "allowed: val/accuracy, val/loss"]),
    ({"space": LR, "objective": {"metric": "accuracy"}}, ["tuning.objective.metric", "allowed: val/accuracy"]),
    ({"space": LR, "objective": {"metric": "val/loss", "direction": "maximize"}},
     ["tuning.objective.direction: 'maximize' would pick the worst trials", "set minimize"]),
    ({"space": LR, "objective": {"direction": "up"}}, ["field 'tuning.objective.direction'", "'maximize' or"]),
    ({"space": LR, "trials": 0}, ["field 'tuning.trials'", "greater than or equal to 1"]),
    ({"space": LR, "trials": 1001}, ["field 'tuning.trials'", "less than or equal to 1000"]),
    ({"space": LR, "parallel": 0}, ["field 'tuning.parallel'", "greater than or equal to 1"]),
    ({"space": LR, "trials": 4, "parallel": 5}, ["field 'tuning'", "parallel 5 is more than tuning.trials 4"]),
    ({"space": LR, "sampler": "cmaes"}, ["field 'tuning.sampler'", "'tpe' or 'random'"]),
    ({"space": LR, "pruner": "asha"}, ["field 'tuning.pruner'", "'median', 'hyperband' or 'none'"]),
    ({"space": LR, "seed": -1}, ["field 'tuning.seed'", "greater than or equal to 0"]),
    ({"space": LR, "trails": 3}, ["field 'tuning.trails'", "did you mean 'trials'"]),
]


@pytest.mark.parametrize(("tuning", "expected"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_tuning_is_refused_naming_the_field(tuning: dict, expected: list[str]) -> None:
    with pytest.raises(SpecError) as exc:
        _parse(tuning)
    message = str(exc.value)
    for part in expected:
        assert part in message, message


def test_own_loop_metric_needs_a_direction_and_the_val_form() -> None:
    space = {"training.params.depth": {"type": "int", "low": 1, "high": 4}}
    with pytest.raises(SpecError, match="tuning.objective.direction: required for metric 'val/f9'"):
        _parse({"space": space, "objective": {"metric": "val/f9"}}, training={"entrypoint": "loop:train"})
    with pytest.raises(SpecError, match="tuning.objective.metric: 'f9' is not a validation metric"):
        _parse({"space": space, "objective": {"metric": "f9", "direction": "maximize"}},
               training={"entrypoint": "loop:train"})


def test_tunable_fields_are_the_models_fields_less_the_run_settings() -> None:
    fields = tunable_fields()
    assert {"training.learning_rate", "training.batch_size", "training.weight_decay", "training.optimizer",
            "training.epochs", "model.hidden_sizes", "model.dropout", "model.channels"} <= set(fields)
    every = {f"training.{n}" for n in TrainingSpec.model_fields} | {f"model.{n}" for n in ModelSpec.model_fields}
    assert set(NOT_TUNABLE) <= every  # the exclusions name real fields
    assert set(fields) == every - set(NOT_TUNABLE)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_val_metrics_are_what_the_training_loop_logs(task: str) -> None:
    module = torch.nn.Linear(3, 2 if task == "classification" else 1)
    x = torch.randn(5, 3)
    y = torch.tensor([0, 1, 0, 1, 1]) if task == "classification" else torch.randn(5, 1)
    assert set(_evaluate(module, x, y, task)) == set(VAL_METRICS[task])


def test_trial_values_make_a_validated_spec() -> None:
    spec = _parse(yaml.safe_load(README_EXAMPLE)["tuning"])
    trial = apply_values(spec, {"training.learning_rate": 0.003, "model.hidden_sizes": [256], "model.dropout": 0.25,
                                "training.batch_size": 48, "training.optimizer": "sgd"})
    assert (trial.training.learning_rate, trial.model.hidden_sizes, trial.model.dropout) == (0.003, [256], 0.25)
    assert (trial.training.batch_size, trial.training.optimizer) == (48, "sgd")
    assert trial.tuning == spec.tuning and trial.training.epochs == spec.training.epochs
    with pytest.raises(SpecError, match="field 'training.learning_rate'"):
        apply_values(spec, {"training.learning_rate": 50.0})


def test_a_dumped_tuning_spec_parses_again_and_takes_trigger_params() -> None:
    spec = _parse(yaml.safe_load(README_EXAMPLE)["tuning"])
    again = parse_spec(spec.model_dump(mode="json"), "dumped")
    assert again == spec and again.spec_hash() == spec.spec_hash()
    assert spec.with_overrides({"epochs": 3}).tuning == spec.tuning


def test_a_tuned_spec_runs_study_and_best_trial_in_place_of_train(tmp_path) -> None:
    """A spec with ``tuning:`` swaps ``train`` for ``study`` and the best trial's ``train``; others are unchanged."""
    from kiln.tasks.pipeline import keys
    from kiln.tasks.pipeline.context import make_context
    from kiln.tasks.pipeline.steps import STEPS, STUDY, TRAIN_BEST, steps_of

    path = tmp_path / "m.yaml"
    (tmp_path / "x.csv").write_text("a,y\n1,0\n")
    local = {**MINIMAL, "source": {"uri": "x.csv"}}
    path.write_text(yaml.safe_dump({**local, "tuning": {"space": LR}}))
    tuned = make_context(path, "manual__1").spec
    names = [s.name for s in steps_of(tuned)]
    assert names[names.index(keys.BUILD_FEATURES) + 1:names.index(keys.EVALUATE)] == [keys.STUDY, keys.TRAIN]
    assert STUDY in steps_of(tuned) and TRAIN_BEST in steps_of(tuned)
    path.write_text(yaml.safe_dump(local))
    assert steps_of(make_context(path, "manual__1", store=None).spec) == STEPS
