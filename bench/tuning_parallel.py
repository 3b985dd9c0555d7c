"""tuning_parallel: the wall time of a study's 8 trials trained 2 at once against 1 at once, through Airflow.

The platform's services (what ``make up`` runs; embedded profile: LocalExecutor, SQLite) start with two copies of
the tabular example pipeline, tuned with the same study settings (the same space, seed, trials and epochs; no
pruner, so every trial trains every epoch) except ``tuning.parallel``: 1 and 2. Each round triggers both through
the REST API, one after the other (the order alternates between rounds), and reads back the task instances: the
trials' span is from the first ``trial`` task's start to the last one's end (``study`` before and ``train`` after
are left out: they are the same in both).

    ratio = span at 1 at once / span at 2 at once     (median over the rounds; target >= 1.6)

Each trial leases one CPU core of the machine's pool (``nproc`` 1), so 2 at once use both cores of a 2-core
machine; the services' own work shares them. ``details`` holds every round (``bench/results/tuning_parallel.md``).
Progress goes to stderr; the JSON line is the last line on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# tests/ is not a package: its service harness (kiln_service, airflow_service) is imported from the folder itself.
sys.path.insert(0, str(REPO / "tests"))

from airflow_client.client.api.dag_api import DAGApi  # noqa: E402
from airflow_client.client.api.task_instance_api import TaskInstanceApi  # noqa: E402
from airflow_client.client.exceptions import NotFoundException  # noqa: E402
from kiln_service import Platform, running_service  # noqa: E402

log = logging.getLogger("tuning_parallel")

SPEC = REPO / "dags" / "pipelines" / "penguins_species.yaml"
TRIALS, EPOCHS, ROUNDS = 8, 40, 1
TARGET = 1.6


def tuned_spec(name: str, parallel: int, epochs: int) -> dict:
    """The penguins pipeline with a study: the learning rate and the hidden sizes, no pruner, registry only."""
    spec = yaml.safe_load(SPEC.read_text())
    spec.update(name=name, deployment={"strategy": "none"}, tuning={
        "space": {"training.learning_rate": {"type": "log_uniform", "low": 1e-3, "high": 0.05},
                  "model.hidden_sizes": {"type": "categorical", "choices": [[32, 16], [64, 32]]}},
        "objective": {"metric": "val/accuracy"}, "trials": TRIALS, "parallel": parallel, "pruner": "none",
        "seed": 1})
    spec["training"].update(epochs=epochs, nproc=1)
    spec["evaluation"]["thresholds"] = {"accuracy": 0.5}
    spec["evaluation"]["gate"].pop("slices")
    spec.pop("monitoring")
    spec.pop("schedule", None)
    return spec


def wait_for_dags(platform: Platform, dag_ids: list[str], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    for dag_id in dag_ids:
        while True:
            try:
                DAGApi(platform.api).get_dag(dag_id)
                break
            except NotFoundException:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"DAG {dag_id} not parsed after {timeout:.0f} s") from None
                time.sleep(0.5)


def study_run(platform: Platform, dag_id: str) -> dict:
    """Trigger one run, wait for it, and return its wall time and the trials' span and most at once."""
    t0 = time.perf_counter()
    run_id = platform.trigger(dag_id, {"use_cache": False})
    state = platform.wait(dag_id, run_id, timeout=3600)
    wall = time.perf_counter() - t0
    if state != "success":
        raise RuntimeError(f"{dag_id} run {run_id} ended {state}\n{platform.service.log_tails()}")
    tis = TaskInstanceApi(platform.api).get_task_instances(dag_id, run_id).task_instances
    trials = [(ti.start_date, ti.end_date) for ti in tis if ti.task_id == "trial"]
    if len(trials) != TRIALS or any(s is None or e is None for s, e in trials):
        raise RuntimeError(f"{dag_id} run {run_id}: expected {TRIALS} finished trials, found {trials}")
    span = (max(e for _, e in trials) - min(s for s, _ in trials)).total_seconds()
    at_once = max(sum(1 for s, e in trials if s <= t < e) for t, _ in trials)
    mean_trial = statistics.mean((e - s).total_seconds() for s, e in trials)
    log.info("%s: trials span %.1f s (%d at once at most, %.1f s per trial task), run %.1f s", dag_id, span,
             at_once, mean_trial, wall)
    return {"span_s": span, "wall_s": wall, "at_once": at_once, "trial_s": mean_trial}


def measure(tmp: Path, rounds: int, epochs: int) -> dict:
    specs = tmp / "specs"
    specs.mkdir(parents=True)
    names = {1: "tuned_one_at_once", 2: "tuned_two_at_once"}
    for parallel, name in names.items():
        (specs / f"{name}.yaml").write_text(yaml.safe_dump(tuned_spec(name, parallel, epochs), sort_keys=False))
    results: list[dict[int, dict]] = []
    with running_service(tmp / "service", specs=sorted(specs.glob("*.yaml"))) as platform:
        wait_for_dags(platform, list(names.values()))
        for r in range(rounds):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            results.append({p: study_run(platform, names[p]) for p in order})
    ratios = [res[1]["span_s"] / res[2]["span_s"] for res in results]
    ratio = statistics.median(ratios)
    one, two = (statistics.median(res[p]["span_s"] for res in results) for p in (1, 2))
    lines = ["| round | at once | trials span s | most at once | s per trial task | run wall s |",
             "|---|---|---|---|---|---|"]
    for i, res in enumerate(results, 1):
        for p in (1, 2):
            c = res[p]
            lines.append(f"| {i} | {p} | {c['span_s']:.1f} | {c['at_once']} | {c['trial_s']:.1f} | {c['wall_s']:.1f} |")
    lines.append(f"\n{TRIALS} trials of {epochs} epochs each, penguins, nproc 1, pruner none; ratio per round: "
                 + ", ".join(f"{x:.3f}" for x in ratios))
    return {"name": "tuning_parallel", "value": round(two, 2), "unit": "s",
            "peer": f"the same study 1 at once (the span of its {TRIALS} trial tasks through Airflow, {epochs} "
                    f"epochs each; result: 2 at once; median over {rounds} round(s); ratio = 1 at once / 2 at once)",
            "peer_value": round(one, 2), "ratio": round(ratio, 3), "target": f">= {TARGET}",
            "details": "\n".join(lines)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds of both runs (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per trial (default %(default)s)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or not 1 <= args.epochs <= 10_000:
        parser.error("--rounds must be >= 1 and --epochs in 1..10000")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    try:
        result = measure(tmp, args.rounds, args.epochs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
