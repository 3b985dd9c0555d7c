"""Helpers shared by the benchmarks: synthetic features folders, the one-line JSON result, pipelines in a private
``KILN_HOME``, and the serving benchmark's TorchScript peer bundle, process CPU time and model-call timing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def write_synthetic_features(folder: Path, *, rows: int, dim: int, n_classes: int, seed: int = 0) -> Path:
    """A features folder in the ``build_features`` layout (``f0..f{d-1}`` + ``target``, ``feature_spec.json``).

    Benchmarks only: the classes come from a random linear map, so the data is learnable but means nothing.
    """
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(dim, n_classes)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", rows), ("val", max(rows // 10, 1)), ("test", max(rows // 10, 1))):
        x = rng.normal(size=(n, dim)).astype(np.float32)
        df = pd.DataFrame(x, columns=[f"f{i}" for i in range(dim)])
        df["target"] = (x @ weights).argmax(1).astype(np.int64)
        df.to_parquet(folder / f"{split}.parquet")
    spec = {"input_dim": dim, "n_classes": n_classes, "task": "classification"}
    (folder / "feature_spec.json").write_text(json.dumps(spec))
    return folder


def steady_samples_per_s(history: list[dict], samples_per_epoch: int, skip: int = 1) -> float:
    """Throughput over the epochs after the first ``skip`` (warm-up), from per-epoch ``train/samples_per_s``."""
    epochs = history[skip:]
    seconds = sum(samples_per_epoch / h["train/samples_per_s"] for h in epochs)
    return samples_per_epoch * len(epochs) / seconds


def emit(name: str, value: float, unit: str, peer: str, peer_value: float, target: str,
         ratio: float | None = None) -> None:
    """Print the result line that ``bench/run_all.py`` reads (it must be the last line printed).

    ``ratio`` defaults to ``value / peer_value``; pass one measured in pairs where the machine's speed drifts.
    """
    ratio = value / peer_value if ratio is None else ratio
    print(json.dumps({"name": name, "value": round(value, 3), "unit": unit, "peer": peer,
                      "peer_value": round(peer_value, 3), "ratio": round(ratio, 3), "target": target}))


#: Runs ``kiln.tasks.pipeline.runner.run_all`` once: argv = spec path, run id, Params as JSON; prints the result
#: as JSON.
_IN_PROCESS_RUN = """
import json, sys, time
from kiln.tasks.pipeline.context import make_context
from kiln.tasks.pipeline.runner import run_all
t0 = time.perf_counter()
ctx = make_context(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
results = run_all(ctx)
print(json.dumps({"duration_s": time.perf_counter() - t0, "steps": list(results.results)}))
"""


def isolated_environ(home: Path, **overrides: str) -> dict[str, str]:
    """This process's environment without any ``AIRFLOW*``/``KILN_*`` variable, with ``KILN_HOME=home``.

    A benchmark's pipeline then keeps its artifacts, MLflow store, pools DB and model servers' state under
    ``home``, never in the user's ``var/`` or wherever their own ``KILN_*`` settings point.

    Args:
        home: the private ``KILN_HOME``.
        overrides: variables set last (a free ``KILN_SERVE_PORT``, so that a deploy step does not reload a model
            server of the user's on the default port).
    """
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "KILN_"))}
    venv_bin = str(Path(sys.executable).parent)
    env.update(KILN_HOME=str(home), GX_ANALYTICS_ENABLED="false", MPLBACKEND="Agg",
               PATH=venv_bin + os.pathsep + env.get("PATH", ""), **overrides)
    return env


def run_pipeline_in_process(spec: Path, params: dict, run_id: str, env: dict[str, str]) -> dict:
    """Run every step of a pipeline with ``kiln.tasks.pipeline.context.run_all`` in one fresh Python process.

    The clock starts after the run package is imported and covers ``make_context`` + ``run_all``. A deploy
    step leaves a model server running: stop it with :func:`stop_model_servers`.

    Args:
        spec: the pipeline spec file.
        params: trigger-time Params, as a DAG run's conf carries them.
        run_id: the run id the artifacts are keyed by.
        env: the process's environment (:func:`isolated_environ`).

    Returns:
        ``{"duration_s": seconds, "steps": [the steps run]}``.

    Raises:
        RuntimeError: the pipeline failed; the message carries the tail of its output.
    """
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _IN_PROCESS_RUN, str(spec), run_id, json.dumps(params)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec.name} in one process exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stop_model_servers(env: dict[str, str]) -> None:
    """Stop every model server started under ``env``'s ``KILN_HOME`` (``kiln serve stop``; idempotent).

    Raises:
        subprocess.CalledProcessError: ``kiln serve stop`` failed.
    """
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "kiln.tasks.cli", "serve", "stop"], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=120)


def write_torchscript_bundle(bundle: Path, model_dir: Path, out: Path) -> Path:
    """``bundle`` as kiln wrote it before bundle format 2: format 1, the network and its output head as TorchScript
    (``model.ts``) instead of ``model.pt2``/``model.onnx``; the peer of ``--runtimes``."""
    import hashlib
    import shutil

    import torch

    from kiln.tasks.bundle.load import DATA_FILES, MANIFEST_FILE, quiet_torchscript
    from kiln.tasks.bundle.program import Servable
    from kiln.tasks.training.networks import load_model

    out.mkdir()
    for name in DATA_FILES:
        shutil.copyfile(bundle / name, out / name)
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    network = load_model(model_dir).module
    with quiet_torchscript():
        scripted = torch.jit.script(Servable(network, manifest["task"] == "classification").eval())
        torch.jit.save(scripted, str(out / "model.ts"))
    files = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in ("model.ts", *DATA_FILES)}
    manifest = {k: v for k, v in manifest.items() if k not in ("runtimes", "onnx")}
    (out / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 1, "files": files}))
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by process ``pid`` and its live descendants (MLflow's uvicorn worker)."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for proc in (root, *root.children(recursive=True)):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def time_model_calls(bundles: dict[str, tuple[Path, str]], rows: tuple[int, ...], cpu: int, calls: int = 3000
                     ) -> dict[str, dict[int, float]]:
    """Microseconds per ``Bundle.predict_features`` call (the model alone, no HTTP) of each named bundle and runtime,
    for each batch size in ``rows``: in this process, pinned to ``cpu``, one torch thread, median of 5 rounds.

    Args:
        bundles: ``{name: (bundle folder, runtime)}``.
        rows: batch sizes.
        cpu: the core to run on (the servers' core).
        calls: calls per round.
    """
    import os
    import statistics
    import time

    import torch

    from kiln.tasks.bundle.load import load_bundle

    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, dict[int, float]] = {}
        for name, (folder, runtime) in bundles.items():
            bundle = load_bundle(folder, runtime)  # type: ignore[arg-type]
            x = np.random.default_rng(0).normal(size=(max(rows), bundle.transform.input_dim)).astype(np.float32)
            out[name] = {}
            for n in rows:
                batch = x[:n]
                for _ in range(200):
                    bundle.predict_features(batch)
                rounds = []
                for _ in range(5):
                    start = time.perf_counter()
                    for _ in range(calls):
                        bundle.predict_features(batch)
                    rounds.append((time.perf_counter() - start) / calls * 1e6)
                out[name][n] = statistics.median(rounds)
        return out
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, affinity)
