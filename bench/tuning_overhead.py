"""tuning_overhead: a study's trials through Airflow against the same trials in one plain Optuna process.

Through Airflow: the platform's services (what ``make up`` runs; embedded profile) run the tabular example pipeline
tuned (the learning rate and the hidden sizes, 2 trials at once, no pruner); the measured span is from the first
``trial`` task's start to the last one's end: mapped tasks, leases, torchrun, a nested MLflow run per trial, a
metric line and a checkpoint per epoch, the study in the lease store's database.

The peer, in this process: an in-memory Optuna study that is given the same trials (``enqueue_trial`` with each
Airflow trial's values), ``optimize(n_jobs=2)`` over a plain PyTorch loop (the network ``model`` names, the
optimizer, batch size, epochs and learning rate of the trial's spec; the validation accuracy at the end) on the
same features (the run's ``build_features`` output), one torch thread per trial.

    ratio = Airflow span / plain wall time     (target <= 1.2)

Both train every epoch of every trial, on ``--rows`` rows drawn from penguins (with replacement, seeded,
numeric columns jittered by 1 % of their spread so that rows differ; written beside the spec as its CSV source).
The default, 20,000 rows, makes trials of about 40 s, as tuning trials are: there the platform's fixed cost per
trial (a task, a fresh training process that imports torch, a nested MLflow run, the export) is amortised.
``--rows 0`` trains on the 344 rows of penguins itself (trials of about 1 s), where that fixed cost is nearly all
of it (2026-12-07: ratio 8.5). The plain study's two trials share one interpreter's lock; each trial task runs in
a process of its own. ``details`` has both sides' per-trial seconds (``bench/results/tuning_overhead.md``).
Progress goes to stderr; the JSON line is the last line on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the service harness (kiln_service) lives in tests/
sys.path.insert(0, str(REPO / "bench"))

from airflow_client.client.api.task_instance_api import TaskInstanceApi  # noqa: E402
from kiln_service import running_service  # noqa: E402
from tuning_parallel import tuned_spec, wait_for_dags  # noqa: E402

log = logging.getLogger("tuning_overhead")

NAME, TRIALS, EPOCHS, ROWS, TARGET = "tuned_overhead", 8, 40, 20_000, 1.2


def write_rows(folder: Path, rows: int) -> str:
    """``rows`` penguins drawn with replacement (seeded, numbers jittered) as a CSV in ``folder``; its spec URI."""
    import importlib.resources

    import numpy as np
    import pandas as pd

    data = pd.read_csv(importlib.resources.files("palmerpenguins") / "data" / "penguins.csv")
    rng = np.random.default_rng(0)
    drawn = data.iloc[rng.integers(0, len(data), rows)].reset_index(drop=True)
    for column in ("bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"):
        drawn[column] = (drawn[column] + rng.normal(0, 0.01 * data[column].std(), rows)).round(2)
    folder.mkdir(parents=True, exist_ok=True)
    drawn.to_csv(folder / "penguins_drawn.csv", index=False)
    return f"{folder.name}/penguins_drawn.csv"


def through_airflow(tmp: Path, epochs: int, rows: int = 0) -> dict:
    """Run the tuned pipeline once; the trials' span, each trial task's seconds, the study's values, the features."""
    from kiln.tasks.settings import get_settings
    from kiln.tasks.spec import parse_spec
    from kiln.tasks.storage.artifacts import run_key
    from kiln.tasks.tuning import open_storage, open_study

    specs = tmp / "specs"
    specs.mkdir(parents=True)
    spec = tuned_spec(NAME, 2, epochs)
    if rows:  # beside the spec in the platform's pipelines folder: the spec's folder is a data root
        spec["source"] = {"uri": write_rows(tmp / "service" / "pipelines" / "data", rows)}
    (specs / f"{NAME}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with running_service(tmp / "service", specs=[specs / f"{NAME}.yaml"]) as platform:
        wait_for_dags(platform, [NAME])
        run_id = platform.trigger(NAME, {"use_cache": False})
        if platform.wait(NAME, run_id, timeout=3600) != "success":
            raise RuntimeError(f"{NAME} run {run_id} failed\n{platform.service.log_tails()}")
        tis = TaskInstanceApi(platform.api).get_task_instances(NAME, run_id).task_instances
        trials = [(ti.start_date, ti.end_date) for ti in tis if ti.task_id == "trial"]
        settings = get_settings(platform.service.env)
        key = run_key(NAME, run_id)
        study = open_study(parse_spec(spec, NAME), key.split("/", 1)[1], open_storage(settings.pools_db_url))
        values = [t.params for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)]
        features = Path(settings.artifact_root) / key / "build_features"
        copy = tmp / "features"
        shutil.copytree(features, copy)  # the platform's home goes with the service
    span = (max(e for _, e in trials) - min(s for s, _ in trials)).total_seconds()
    return {"span_s": span, "trial_s": sorted((e - s).total_seconds() for s, e in trials), "values": values,
            "features": copy, "spec": spec}


def plain_study(spec_dict: dict, values: list[dict], features: Path) -> dict:
    """The same trials in one process: Optuna in memory, a plain PyTorch loop, 2 trials at once."""
    import optuna
    import torch
    from torch import nn

    from kiln.tasks.features.splits import load_split
    from kiln.tasks.spec import parse_spec
    from kiln.tasks.training.networks import build_model
    from kiln.tasks.tuning import apply_values, suggest

    spec = parse_spec(spec_dict, NAME)
    assert spec.tuning is not None
    x, y = (torch.from_numpy(a) for a in load_split(features, "train"))
    xv, yv = (torch.from_numpy(a) for a in load_split(features, "val"))
    n_classes = int(json.loads((features / "feature_spec.json").read_text())["n_classes"])
    torch.set_num_threads(1)  # one core per trial, as each trial task leases one
    seconds: list[float] = []

    def objective(trial: optuna.Trial) -> float:
        started = time.perf_counter()
        run = apply_values(spec, suggest(trial, spec.tuning.space), source=f"trial {trial.number}")
        t = run.training
        generator = torch.Generator().manual_seed(t.seed)
        model = build_model(run.model, x.shape[1], n_classes)
        opt_cls = torch.optim.Adam if t.optimizer == "adam" else torch.optim.SGD
        optimizer = opt_cls(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
        loss_fn = nn.CrossEntropyLoss()
        steps = math.ceil(len(x) / t.batch_size)
        for _ in range(t.epochs):
            order = torch.randperm(len(x), generator=generator)
            for s in range(steps):
                idx = order[s * t.batch_size:(s + 1) * t.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(x[idx]), y[idx]).backward()
                optimizer.step()
        with torch.no_grad():
            accuracy = (model(xv).argmax(1) == yv).float().mean().item()
        seconds.append(time.perf_counter() - started)
        return accuracy

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=1))
    for params in values:
        study.enqueue_trial(params)
    started = time.perf_counter()
    study.optimize(objective, n_trials=len(values), n_jobs=2)
    return {"wall_s": time.perf_counter() - started, "trial_s": sorted(seconds)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per trial (default %(default)s)")
    parser.add_argument("--rows", type=int, default=ROWS, help="train on this many rows drawn from penguins; 0: "
                                                              "penguins' own 344 (default %(default)s)")
    args = parser.parse_args(argv)
    if not 1 <= args.epochs <= 10_000:
        parser.error("--epochs must be in 1..10000")
    if not 0 <= args.rows <= 10_000_000:
        parser.error("--rows must be in 0..10000000")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    try:
        airflow = through_airflow(tmp, args.epochs, args.rows)
        log.info("through Airflow: trials span %.1f s", airflow["span_s"])
        plain = plain_study(airflow["spec"], airflow["values"], airflow["features"])
        log.info("one plain process: %.1f s", plain["wall_s"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = airflow["span_s"] / plain["wall_s"]
    details = "\n".join([
        "| | wall s | trials | s per trial (median) | s per trial (max) |", "|---|---|---|---|---|",
        f"| through Airflow (span of the trial tasks) | {airflow['span_s']:.1f} | {len(airflow['trial_s'])} | "
        f"{statistics.median(airflow['trial_s']):.1f} | {max(airflow['trial_s']):.1f} |",
        f"| one plain process (Optuna n_jobs=2, plain loop) | {plain['wall_s']:.1f} | {len(plain['trial_s'])} | "
        f"{statistics.median(plain['trial_s']):.1f} | {max(plain['trial_s']):.1f} |",
        f"\n{len(airflow['values'])} trials of {args.epochs} epochs each, "
        f"{f'{args.rows} rows drawn from penguins' if args.rows else 'penguins'}, 2 at once, pruner none; the plain "
        "study is given the Airflow study's values."])
    print(json.dumps({"name": "tuning_overhead", "value": round(airflow["span_s"], 2), "unit": "s",
                      "peer": f"the same {TRIALS} trials in one plain Optuna process (in-memory study, n_jobs=2, a "
                              "plain PyTorch loop on the same features; ratio = Airflow / plain; "
                              f"{args.epochs} epochs, {args.rows or 344} rows)",
                      "peer_value": round(plain["wall_s"], 2), "ratio": round(ratio, 3), "target": f"<= {TARGET}",
                      "details": details}), flush=True)


if __name__ == "__main__":
    main()
