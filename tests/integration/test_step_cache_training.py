"""The step cache with real training (torchrun, one rank, MLflow on SQLite, a local store): a rerun with only
``epochs`` changed reuses ingest, clean and build_features and trains the same model as a full rerun without the
cache; with ``cache.train`` an unchanged rerun reuses the model without training."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from cache_fixtures import Counted, run_data_steps

from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import make_context
from kiln.tasks.storage.artifacts import LocalArtifactStore

pytestmark = pytest.mark.integration

STEPS = (keys.INGEST, keys.VALIDATE, keys.CLEAN, keys.BUILD_FEATURES, keys.TRAIN)
DATA_STEPS = STEPS[:-1]


def write_pipeline(folder: Path) -> Path:
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=300).round(3), rng.normal(size=300).round(3)
    pd.DataFrame({"x1": x1, "x2": x2, "kind": rng.choice(["a", "b"], size=300),
                  "y": np.where(x1 + x2 > 0, "hi", "lo")}).to_csv(folder / "data.csv", index=False)
    path = folder / "cache_train.yaml"
    path.write_text(yaml.safe_dump({"name": "cache_train", "source": {"uri": "data.csv"}, "target": "y",
                                    "task": "classification", "cache": {"train": True},
                                    "training": {"nproc": 1, "batch_size": 64}}))
    return path


def state_dict_bytes(store: LocalArtifactStore, run_key: str) -> dict[str, bytes]:
    import torch

    payload = torch.load(store.path(f"{run_key}/train") / "model.pt", map_location="cpu", weights_only=False)
    out = {}
    for name, tensor in payload["state_dict"].items():
        buf = io.BytesIO()
        np.save(buf, tensor.numpy())
        out[name] = buf.getvalue()
    return out


def test_rerun_with_other_epochs_trains_the_model_a_full_rerun_trains(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    spec, store, counted = write_pipeline(tmp_path), LocalArtifactStore(tmp_path / "store"), Counted()
    first = run_data_steps(spec, "manual__1", store, counted, DATA_STEPS, epochs=1)
    assert counted.calls == list(DATA_STEPS) and all(r["cache"].startswith("miss: ") for r in first.values())

    counted.calls.clear()
    with caplog.at_level(logging.INFO, logger="kiln.tasks.pipeline.step_cache"):
        cached = run_data_steps(spec, "manual__2", store, counted, STEPS, epochs=3)
    assert counted.calls == [keys.TRAIN], "ingest, validate, clean and build_features were reused"
    for name in DATA_STEPS:
        key = first[name]["cache"].removeprefix("miss: ")
        if name == keys.VALIDATE:
            # Run 1 made its snapshot the accepted one, so run 2's key holds that profile: the second key run 1
            # recorded when it passed.
            key = cached[name]["cache"].removeprefix("hit: ").removesuffix(" from run manual__1")
        assert cached[name]["cache"] == f"hit: {key} from run manual__1"
        assert f"cache hit: {key} from run manual__1" in caplog.text
    assert cached[keys.TRAIN]["cache"].startswith("miss: ")
    snapshot = "snapshot.parquet"
    assert os.path.samefile(store.path("cache_train/manual__1/ingest") / snapshot,
                            store.path("cache_train/manual__2/ingest") / snapshot)

    counted.calls.clear()
    full = run_data_steps(spec, "manual__3", store, counted, STEPS, epochs=3, use_cache=False)
    assert counted.calls == list(STEPS) and all(r["cache"] == "off" for r in full.values())
    assert state_dict_bytes(store, "cache_train/manual__2") == state_dict_bytes(store, "cache_train/manual__3")
    losses = [{k: v for k, v in r[keys.TRAIN]["final"].items() if "per_s" not in k} for r in (cached, full)]
    assert losses[0] == losses[1]

    counted.calls.clear()
    again = run_data_steps(spec, "manual__4", store, counted, STEPS, epochs=3)
    assert counted.calls == [], "with cache.train the model of run 2 is reused, without training"
    assert again[keys.TRAIN]["cache"] == cached[keys.TRAIN]["cache"].replace("miss: ", "hit: ") + " from run manual__2"
    assert again[keys.TRAIN]["model_uri"] == store.uri("cache_train/manual__4/train")
    assert os.path.samefile(store.path("cache_train/manual__2/train") / "model.pt",
                            store.path("cache_train/manual__4/train") / "model.pt")


def test_train_operator_reuses_a_cached_model_without_leasing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The train task looks the cache up before it asks the pool for devices: a hit leases nothing."""
    from types import SimpleNamespace

    from kiln.operators.train import TrainOperator
    from kiln.tasks.pipeline.cache_keys import train_key
    from kiln.tasks.pipeline.step_cache import record

    spec, counted = write_pipeline(tmp_path), Counted()
    run_id = f"manual__op_{tmp_path.name}"
    ctx = make_context(spec, run_id, {"epochs": 2})
    run_data_steps(spec, run_id, ctx.store, counted, DATA_STEPS, epochs=2)
    ctx.publish(keys.TRAIN, lambda out: (out / "model.pt").write_bytes(b"weights"))  # stands for a trained model
    key = train_key(ctx)
    assert key is not None
    record(ctx, key, {"model_uri": ctx.store.uri(ctx.key(keys.TRAIN)), "final": {"val/loss": 0.5}})

    def no_lease(self: Any, context: Any) -> Any:
        raise AssertionError("the train task asked for devices although the model is cached")

    monkeypatch.setattr(TrainOperator, "lease_request", no_lease)
    again = f"{run_id}_again"
    run_data_steps(spec, again, ctx.store, counted, DATA_STEPS, epochs=2)  # hits: the same features
    assert counted.calls == list(DATA_STEPS)
    ti = SimpleNamespace(dag_id="cache_train", run_id=again, task_id="train", try_number=1)
    result = TrainOperator(task_id="train", spec_path=str(spec)).execute(
        {"run_id": again, "params": {"epochs": 2}, "ti": ti})
    assert result["cache"] == f"hit: {key.digest} from run {run_id}" and result["peak_rss_mib"] > 0
    assert result["model_uri"] == ctx.store.uri(f"cache_train/{again}/train")
    assert (ctx.store.path(f"cache_train/{again}/train") / "model.pt").read_bytes() == b"weights"
