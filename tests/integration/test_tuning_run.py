"""A tuned run in this process (``run_all``): the study step, each trial trained with torchrun on its own values
into its own folders and nested MLflow run, pruned trials stopped mid-job, and the best trial published as the
run's ``train`` output, evaluated and gated unchanged. Through Airflow: ``test_tuning_dag.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import make_context
from kiln.tasks.storage.artifacts import LocalArtifactStore

pytestmark = pytest.mark.integration


def write_tuned_pipeline(folder: Path, **tuning: object) -> Path:
    rng = np.random.default_rng(3)
    x1, x2 = rng.normal(size=400).round(3), rng.normal(size=400).round(3)
    pd.DataFrame({"x1": x1, "x2": x2, "y": np.where(x1 - x2 > 0, "hi", "lo")}).to_csv(folder / "data.csv",
                                                                                       index=False)
    path = folder / "tuned.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tuned", "source": {"uri": "data.csv"}, "target": "y", "task": "classification",
        "training": {"nproc": 1, "batch_size": 32, "epochs": 6},
        "evaluation": {"primary_metric": "accuracy", "thresholds": {"accuracy": 0.5}},
        "deployment": {"strategy": "none"},
        "tuning": {"space": {"training.learning_rate": {"type": "log_uniform", "low": 1e-4, "high": 0.05}},
                   "objective": {"metric": "val/accuracy"}, "seed": 7, **tuning}}))
    return path


def test_a_tuned_run_trains_each_trial_prunes_the_hopeless_and_publishes_the_best(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from kiln.tasks.pipeline.runner import run_all
    from kiln.tasks.pipeline.tuned_run import open_run_study
    from kiln.tasks.settings import get_settings

    store = LocalArtifactStore(tmp_path / "store")
    ctx = make_context(write_tuned_pipeline(tmp_path, trials=5, parallel=1, pruner="median"), "manual__t1",
                       store=store)
    run = run_all(ctx, until=keys.GATE)
    trials = {k: v.to_dict() for k, v in run.results.items() if k.startswith("trial[")}
    assert sorted(trials) == [f"trial[{i}]" for i in range(5)]
    study = open_run_study(ctx)
    states = [t.state for t in study.trials]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states, states
    assert len({t.params["training.learning_rate"] for t in study.trials}) == 5
    complete = {t.number: t.value for t in study.trials if t.state == TrialState.COMPLETE}
    best = run[keys.TRAIN].to_dict()
    assert best["best_value"] == max(complete.values()) and complete[best["best_trial"]] == best["best_value"]
    assert best["states"] == {"COMPLETE": len(complete), "PRUNED": 5 - len(complete)}
    # The run's model is the best trial's, byte for byte, and it goes on through evaluate and gate.
    published = store.path(ctx.key(keys.TRAIN)) / "model.pt"
    assert published.read_bytes() == (store.path(ctx.key(keys.trial_key(best["best_trial"], keys.TRAIN)))
                                      / "model.pt").read_bytes()
    assert run[keys.GATE].to_dict()["candidate_metrics"]["accuracy"] > 0.5

    # Each trial is a nested MLflow run: finished ones FINISHED, pruned ones KILLED after fewer epochs.
    client = MlflowClient(get_settings().mlflow_tracking_uri)
    parent = best["mlflow_run_id"]
    children = {int(c.data.tags["kiln.trial_number"]): c for c in client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert sorted(children) == [t.number for t in study.trials]
    for t in study.trials:
        child = children[t.number]
        assert float(child.data.params["training.learning_rate"]) == pytest.approx(t.params["training.learning_rate"])
        if t.state == TrialState.PRUNED:
            assert child.info.status == "KILLED" and t.last_step < 6
            assert len(client.get_metric_history(child.info.run_id, "val/accuracy")) < 6
        else:
            assert child.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent, "tuning")}
    assert {"tuning/study.json", "tuning/optimization_history.png"} <= artifacts, artifacts
    assert client.get_run(parent).data.tags["kiln.tuning.best_trial"] == str(best["best_trial"])


def test_a_study_whose_trials_all_fail_fails_the_run_with_the_first_error(tmp_path: Path) -> None:
    from optuna.trial import TrialState

    from kiln.tasks.pipeline.runner import run_all
    from kiln.tasks.pipeline.tuned_run import open_run_study
    from kiln.tasks.tuning import TuningError

    path = write_tuned_pipeline(tmp_path, trials=2, parallel=1)
    spec = yaml.safe_load(path.read_text())
    spec["training"]["entrypoint"] = "loop.py:train"  # the pipeline's own loop, broken
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "loop.py").write_text("def train(ctx):\n    raise RuntimeError('the loop is broken')\n")
    path.write_text(yaml.safe_dump(spec))
    ctx = make_context(path, "manual__f1", store=LocalArtifactStore(tmp_path / "store"))
    with pytest.raises(TuningError, match=r"(?s)all 2 trials failed; the first error: trial 0: .*the loop is broken"):
        run_all(ctx, until=keys.TRAIN)
    assert [t.state for t in open_run_study(ctx).trials] == [TrialState.FAIL] * 2
    assert not ctx.store.exists(ctx.key(keys.TRAIN))


def test_trials_of_the_pipelines_own_loop_vary_its_params_and_report_from_its_log_metrics(tmp_path: Path) -> None:
    """The own-code issue's loops are tuned like kiln's: each trial's values reach the loop (``ctx.hparams``), the
    objective comes from the loop's own ``ctx.log_metrics`` every epoch, and the best trial's exported program is
    the run's model."""
    import shutil

    import torch
    from optuna.trial import TrialState

    from kiln.tasks.pipeline.runner import run_all
    from kiln.tasks.pipeline.tuned_run import open_run_study

    path = write_tuned_pipeline(tmp_path, trials=2, parallel=1, pruner="none")
    spec = yaml.safe_load(path.read_text())
    # The spec's own width, 16, is not a choice: a trial whose value did not reach the loop would show it.
    spec["training"].update(entrypoint="loop.py:train", epochs=3, params={"width": 16, "warmup_epochs": 1})
    spec["tuning"]["space"] = {"training.params.width": {"type": "categorical", "choices": [8, 24]},
                               "training.learning_rate": {"type": "log_uniform", "low": 1e-3, "high": 0.05}}
    (tmp_path / "tuned").mkdir()
    shutil.copy(Path(__file__).resolve().parents[2] / "dags" / "pipelines" / "penguins_ownloop" / "loop.py",
                tmp_path / "tuned" / "loop.py")
    path.write_text(yaml.safe_dump(spec))
    store = LocalArtifactStore(tmp_path / "store")
    ctx = make_context(path, "manual__o1", store=store)

    run = run_all(ctx, until=keys.TRAIN)

    trials = open_run_study(ctx).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        assert sorted(t.intermediate_values) == [1, 2, 3]  # one report per epoch of the loop
        assert t.value == t.intermediate_values[3]
    for t in trials:  # the loop built its network from the trial's width: the exported program's first layer
        program = torch.export.load(store.path(ctx.key(keys.trial_key(t.number, keys.TRAIN))) / "model.pt2")
        stem = [v for k, v in program.state_dict.items() if k.endswith("stem.weight")]
        assert [w.shape[0] for w in stem] == [t.params["training.params.width"]], list(program.state_dict)
    best = run[keys.TRAIN].to_dict()
    published = store.path(ctx.key(keys.TRAIN))
    best_folder = store.path(ctx.key(keys.trial_key(best["best_trial"], keys.TRAIN)))
    assert (published / "model.pt2").read_bytes() == (best_folder / "model.pt2").read_bytes()
