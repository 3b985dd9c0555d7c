"""Real model bundles for the serving tests: a tiny classifier trained in process and exported as a bundle.

:func:`make_bundle` runs the real steps on a small synthetic table (``build_features``, ``run_train`` at world
size 1, ``export_bundle``) and returns the bundle folder; :func:`records` gives raw rows of that table as a client
sends them. The ``bundle_factory`` fixture caches bundles per session (training takes about a second each), so
import it into a test module (``from serving_fixtures import bundle_factory  # noqa: F401``) and call it with the
seed that tells two versions apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

#: The raw columns of the synthetic table (the label is ``species``).
NUMERIC = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm")
CATEGORICAL = ("island",)
TARGET = "species"
CLASSES = ("Adelie", "Chinstrap", "Gentoo")
ISLANDS = ("Biscoe", "Dream", "Torgersen")
#: A valid bill length so far outside the data that a "poison" bundle's network raises on it (see
#: :func:`make_failing_bundle`); a healthy model answers it like any other value.
POISON_BILL_LENGTH = 1e9


def raw_table(n: int = 300, seed: int = 0) -> pd.DataFrame:
    """A penguin-like table: three species told apart by their measurements, the island a weak hint."""
    rng = np.random.default_rng(seed)
    species = rng.integers(0, 3, n)
    centers = np.array([[39.0, 18.5, 190.0], [49.0, 18.5, 196.0], [47.0, 15.0, 217.0]])
    x = centers[species] + rng.normal(scale=[2.5, 1.0, 6.0], size=(n, 3))
    df = pd.DataFrame({name: x[:, i] for i, name in enumerate(NUMERIC)})
    island = np.where(rng.random(n) < 0.6, species, rng.integers(0, 3, n))
    df["island"] = pd.array(np.array(ISLANDS)[island], dtype="string")
    df[TARGET] = pd.array(np.array(CLASSES)[species], dtype="string")
    return df


def records(n: int = 1, seed: int = 1) -> list[dict[str, Any]]:
    """``n`` raw rows as JSON-ready records (the input of ``POST /predict``), without the label."""
    df = raw_table(max(n, 3), seed).head(n).drop(columns=[TARGET])
    return json.loads(df.to_json(orient="records"))


def make_bundle(root: Path, *, seed: int = 0, epochs: int = 4) -> Path:
    """Train a tiny MLP on :func:`raw_table` and export it as a bundle.

    Args:
        root: an empty working folder; the bundle is ``root / "bundle"``.
        seed: seed of the data and the training run (different seeds give different models).
        epochs: training epochs.

    Returns:
        The bundle folder (loadable with ``kiln.tasks.bundle.load.load_bundle``).
    """
    from kiln.tasks.bundle.export import ExportConfig, export_bundle
    from kiln.tasks.spec import FeaturesSpec, ModelSpec, TrainingSpec
    from kiln.tasks.steps.build_features import BuildFeaturesConfig, run_build_features
    from kiln.tasks.training.job import TrainConfig
    from kiln.tasks.training.loop import run_train

    clean, features, train = root / "clean", root / "features", root / "train"
    for folder in (clean, features, train):
        folder.mkdir(parents=True)
    raw_table(seed=seed).to_parquet(clean / "clean.parquet", index=False)
    types = {**dict.fromkeys(NUMERIC, "numeric"), "island": "categorical", TARGET: "categorical"}
    (clean / "clean_report.json").write_text(json.dumps({"column_types": types, "target": TARGET,
                                                         "task": "classification"}))
    run_build_features(BuildFeaturesConfig(TARGET, "classification", FeaturesSpec(), seed=seed), clean, features)
    config = TrainConfig(features_dir=str(features), output_dir=str(train), checkpoint_dir=str(root / "ckpt"),
                         task="classification", model=ModelSpec(hidden_sizes=[16]),
                         training=TrainingSpec(epochs=epochs, batch_size=16, learning_rate=5e-3, seed=seed,
                                               log_every_steps=1000))
    run_train(config)
    return export_bundle(ExportConfig(features_dir=features, model_dir=train), root / "bundle").bundle_dir


class _Failing(nn.Module):
    """A network that raises on rows holding a feature beyond ``threshold`` in magnitude (like a model with a bug
    that only some inputs reach), and otherwise answers as the wrapped one. The check is a run-time assertion, which
    ``torch.export`` keeps in the program (and which keeps the model off ONNX, whose conversion would drop it)."""

    def __init__(self, inner: nn.Module, threshold: float):
        super().__init__()
        self.inner = inner
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert_async((x.abs() <= self.threshold).all(), "the model failed on an input beyond its threshold")
        return self.inner(x)


def _trained_network(model_dir: Path) -> nn.Module:
    """The network saved in a ``train`` output folder (``model.pt``)."""
    from kiln.tasks.training.networks import load_model

    return load_model(model_dir).module


def _rewrite_manifest(out: Path, **changes: Any) -> None:
    """Apply ``changes`` to ``out``'s manifest and hash the files it lists again, as an export would have."""
    from kiln.tasks.bundle.load import MANIFEST_FILE, ONNX_FILE, content_files

    manifest = {**json.loads((out / MANIFEST_FILE).read_text()), **changes}
    if not (out / ONNX_FILE).exists():
        manifest["files"].pop(ONNX_FILE, None)
    manifest["files"] = {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
                         for name in content_files(manifest)}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))


def make_failing_bundle(good: Path, out: Path, *, fails_on: Literal["poison", "always"]) -> Path:
    """A copy of bundle ``good`` whose network raises inside the forward pass, with a consistent manifest.

    Args:
        good: a bundle folder from :func:`make_bundle`.
        out: where to write the copy (must not exist).
        fails_on: ``poison``: only on records with ``bill_length_mm`` = :data:`POISON_BILL_LENGTH` (the bundle's
            own sample passes, so it loads and warms up); ``always``: on every input (its warm-up fails).

    Returns:
        ``out``, loadable with ``kiln.tasks.bundle.load.load_bundle`` (the file hashes match); it runs with the
        torch runtime (no ``model.onnx``).
    """
    from kiln.tasks.bundle.load import MANIFEST_FILE, MODEL_FILE, ONNX_FILE
    from kiln.tasks.bundle.program import MAX_BATCH, Servable, save_program

    shutil.copytree(good, out)
    (out / ONNX_FILE).unlink(missing_ok=True)
    # Standardised features of real rows stay within a few units; the poison value lands near 1e8.
    network = _trained_network(good.parent / "train")  # make_bundle's layout
    servable = Servable(_Failing(network, 1e6 if fails_on == "poison" else 0.0), True).eval()
    x = torch.zeros(4, servable.network.inner.net[0].in_features)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # torch.export directly: kiln's export_program runs the program to check it, which "always" would fail.
    program = torch.export.export(servable, (x,), dynamic_shapes=({0: batch},), strict=False)
    meta = json.loads((out / MANIFEST_FILE).read_text())["model"]
    save_program(program, out / MODEL_FILE, meta)
    _rewrite_manifest(out, runtimes=["torch"], onnx={"file": None, "reason": "a test model that raises"})
    return out


def make_bundle_without_onnx(good: Path, out: Path, *, reason: str = "not converted (a test)") -> Path:
    """A copy of bundle ``good`` as export writes one whose model has no faithful ONNX conversion: no
    ``model.onnx``, ``reason`` in the manifest (it serves with the torch runtime)."""
    from kiln.tasks.bundle.load import ONNX_FILE

    shutil.copytree(good, out)
    (out / ONNX_FILE).unlink()
    _rewrite_manifest(out, runtimes=["torch"], onnx={"file": None, "reason": reason})
    return out


def make_torchscript_bundle(good: Path, out: Path, model_dir: Path | None = None) -> Path:
    """A format 1 bundle (TorchScript ``model.ts``, as kiln wrote before format 2) of the model of bundle ``good``.

    Args:
        good: a bundle folder.
        out: where to write it (must not exist).
        model_dir: the ``train`` output of ``good``'s model (default: :func:`make_bundle`'s, beside ``good``).
    """
    from kiln.tasks.bundle.load import MANIFEST_FILE, MODEL_FILE, ONNX_FILE, quiet_torchscript
    from kiln.tasks.bundle.program import Servable

    shutil.copytree(good, out)
    for name in (MODEL_FILE, ONNX_FILE):
        (out / name).unlink(missing_ok=True)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    network = _trained_network(model_dir or good.parent / "train")
    with quiet_torchscript():
        scripted = torch.jit.script(Servable(network, manifest["task"] == "classification").eval())
        torch.jit.save(scripted, str(out / "model.ts"))
    manifest = {k: v for k, v in manifest.items() if k not in ("runtimes", "onnx")}
    (out / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 1}))
    _rewrite_manifest(out)
    return out


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``bundle_factory(seed=0)``: the bundle folder of a tiny model trained with ``seed`` (cached per session)."""
    made: dict[int, Path] = {}

    def factory(seed: int = 0) -> Path:
        if seed not in made:
            made[seed] = make_bundle(tmp_path_factory.mktemp(f"bundle-seed{seed}"), seed=seed)
        return made[seed]

    return factory


def expected_predictions(bundle: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What bundle ``bundle`` answers to ``rows`` in process (the ``predictions`` of ``POST /predict``)."""
    from kiln.tasks.bundle.load import load_bundle

    loaded = load_bundle(bundle)
    return loaded.format_predictions(loaded.predict_records(rows))


def assert_same_predictions(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """The same labels, and probabilities within 1e-6 (the runtimes differ in the last bits)."""
    assert [p["label"] for p in got] == [p["label"] for p in want]
    for g, w in zip(got, want, strict=True):
        assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-6)


#: Seconds a test model server may take to import torch, load and warm its bundles.
SERVER_START_TIMEOUT_S = 90.0


@dataclass
class ServerProcess:
    """A real ``python -m kiln.tasks.serving`` process on a loopback port (see :func:`start_server_process`)."""

    proc: subprocess.Popen
    url: str
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then the exit code (SIGKILL and a test failure after 30 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the server did not stop within 30 s of SIGTERM:\n{self.log_text()[-3000:]}")


def start_server_process(deployment: Path, log: Path, *extra: str, env: dict[str, str] | None = None,
                         nofile: int | None = None) -> ServerProcess:
    """Start a model server on a free loopback port and wait until ``/ready`` answers 200.

    Args:
        deployment: the deployment file to serve.
        log: where the server's output goes.
        extra: more command-line arguments.
        env: extra environment variables (``PYTHONPATH`` reaches the checkout).
        nofile: the server's descriptor limit, soft and hard (``RLIMIT_NOFILE``); ``None``: inherited.
    """
    import httpx
    from conftest import free_port

    repo = Path(__file__).resolve().parents[1]
    port = free_port()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}),
                "PYTHONPATH": os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p)}

    def limit_descriptors() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kiln.tasks.serving", "--deployment", str(deployment),
                                 "--host", "127.0.0.1", "--port", str(port), *extra], cwd=repo, env=full_env,
                                stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=limit_descriptors if nofile else None)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", port, log)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with code {proc.returncode}:\n{server.log_text()[-3000:]}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"the server was not ready within {SERVER_START_TIMEOUT_S} s:\n{server.log_text()[-3000:]}")
        time.sleep(0.1)


def wait_until(what: str, check: Callable[[], Any], timeout_s: float, state: Callable[[], Any] = lambda: "",
               poll_s: float = 0.1) -> Any:
    """``check()``'s first truthy value, polled every ``poll_s``; an AssertionError naming ``what`` (and
    ``state()``, what the test was looking at) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(poll_s)
    raise AssertionError(f"{what} did not happen within {timeout_s:g} s {state()}".rstrip())
