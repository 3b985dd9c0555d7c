"""data_scale: kiln's ingest -> clean -> build_features on a synthetic table of ``rows`` x 50 columns, against a
plain pandas script doing the same operations on the same file (``bench/_pandas_features.py``). ``validate`` (the
default suite and the profile) runs too, between ingest and clean, and is reported beside the comparison: the
peer checks nothing.

The table (``bench/_synthetic.py``: 45 numeric, 4 categorical columns and a 3-class label, with missing values and
repeated rows) is generated in chunks into ``--folder`` (default: the temporary folder; never the repository) and
kept there for later runs. Each kiln step runs in its own Python process, as a DAG task does, through its library
function (``run_ingest``, ``run_clean``, ``run_build_features``) with the default spec sections; the peer is one
process. Wall time is each process's, start-up and imports included (both sides); CPU time is its user + system
time. Peak RSS is each process's ``ru_maxrss``; kiln's is the largest of its three steps. Every process runs with
``oom_score_adj`` 1000, so that if memory runs out the kernel ends it, not other work; a peer that dies so is
reported as such, and the ratios are then taken at the largest size where it finished. A sampler polls
``/proc/meminfo`` every 0.5 s for the lowest ``MemAvailable`` and the most swap in use while anything runs. With
``--train``, one epoch of kiln's training loop (``run_train``, one rank, MLP 64-32, batch 4096) runs on the
largest size's features, also in its own process.

Ratios (at the largest size the peer finished): rows/s kiln / pandas (target >= 1.0) and peak RSS kiln / pandas
(target <= 0.5).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _synthetic import write_synthetic_table

BENCH = Path(__file__).resolve().parent
log = logging.getLogger("data_scale")

#: One kiln step in its own process: argv = step, folder; prints wall seconds and peak RSS as JSON.
STEP = """
import json, logging, resource, sys, time
from pathlib import Path
logging.basicConfig(level=logging.WARNING)
step, folder = sys.argv[1], Path(sys.argv[2])
start = time.perf_counter()
from kiln.tasks.spec import CleaningSpec, FeaturesSpec, SourceSpec
if step == "ingest":
    from kiln.tasks.steps.ingest import IngestConfig, run_ingest
    config = IngestConfig(source=SourceSpec(uri=str(folder / "source.parquet"), format="parquet"),
                          data_roots=(folder,))
    run_ingest(config, folder / "ingest")
elif step == "validate":
    from kiln.tasks.spec import ExpectationsSpec
    from kiln.tasks.steps.validate import ValidateConfig, run_validate
    result = run_validate(ValidateConfig(target="label", task="classification", columns={},
                                         expectations=ExpectationsSpec()), folder / "ingest", folder / "validate")
    assert result.success, result.failed
elif step == "clean":
    from kiln.tasks.steps.clean import CleanConfig, run_clean
    run_clean(CleanConfig(target="label", task="classification", columns={}, cleaning=CleaningSpec()),
              folder / "ingest", folder / "clean")
else:
    from kiln.tasks.steps.build_features import BuildFeaturesConfig, run_build_features
    run_build_features(BuildFeaturesConfig(target="label", task="classification", features=FeaturesSpec(), seed=42),
                       folder / "clean", folder / "build_features")
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s": time.perf_counter() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "peak_rss_mib": usage.ru_maxrss / 1024}))
"""

#: One epoch of kiln's training loop on one rank: argv = features folder, work folder.
TRAIN = """
import json, resource, sys, time
from pathlib import Path
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.training.job import TrainConfig
from kiln.tasks.training.runner import run_train
features, work = Path(sys.argv[1]), Path(sys.argv[2])
start = time.perf_counter()
config = TrainConfig(features_dir=str(features), output_dir=str(work / "out"), checkpoint_dir=str(work / "ckpt"),
                     task="classification", model=ModelSpec(hidden_sizes=[64, 32]),
                     training=TrainingSpec(epochs=1, batch_size=4096, learning_rate=1e-3, seed=0,
                                           threads_per_proc=2, log_every_steps=500))
run_train(config)
history = json.loads((work / "out" / "train_metrics.json").read_text())["history"]
print(json.dumps({"wall_s": time.perf_counter() - start, "samples_per_s": history[-1]["train/samples_per_s"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


class MemorySampler:
    """Polls ``/proc/meminfo``: the lowest ``MemAvailable`` and the most swap in use (MiB) since ``start``."""

    def __init__(self) -> None:
        self.min_available_mib = float("inf")
        self.max_swap_used_mib = 0.0
        self.swap_total_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            info = {line.split(":")[0]: float(line.split()[1]) / 1024
                    for line in Path("/proc/meminfo").read_text().splitlines()}
            self.min_available_mib = min(self.min_available_mib, info["MemAvailable"])
            self.swap_total_mib = info["SwapTotal"]
            self.max_swap_used_mib = max(self.max_swap_used_mib, info["SwapTotal"] - info["SwapFree"])


def _expendable() -> None:
    """In the child before it starts: the first process the kernel ends if memory runs out."""
    Path("/proc/self/oom_score_adj").write_text("1000")


def _run(code_or_script: str, *args: str) -> dict:
    """Run a Python snippet (or a script under ``bench/``) in a fresh process; return its last JSON line, with
    ``wall_s`` replaced by the process's whole wall time (start-up and imports included, on both sides)."""
    argv = ([sys.executable, str(BENCH / code_or_script)] if code_or_script.endswith(".py")
            else [sys.executable, "-c", code_or_script])
    start = time.perf_counter()
    proc = subprocess.run([*argv, *args], cwd=BENCH.parent, capture_output=True, text=True,
                          preexec_fn=_expendable)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[-1][:40]!r} {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def measure(rows: int, folder: Path) -> dict:
    """kiln's three steps and the pandas peer on one table of ``rows`` rows; the figures of each."""
    import shutil

    data = folder / f"rows_{rows}"
    source = data / "source.parquet"
    if not source.is_file():
        log.warning("generating %d rows into %s", rows, source)
        write_synthetic_table(source, rows)
    for name in ("ingest", "validate", "clean", "build_features", "pandas"):
        shutil.rmtree(data / name, ignore_errors=True)
    steps = {}
    for step in ("ingest", "validate", "clean", "build_features"):
        (data / step).mkdir()
        steps[step] = _run(STEP, step, str(data))
        log.warning("%d rows: kiln %s %.1f s, peak RSS %.0f MiB", rows, step, steps[step]["wall_s"],
                    steps[step]["peak_rss_mib"])
    try:
        peer = _run("_pandas_features.py", str(source), str(data / "pandas"))
        log.warning("%d rows: pandas %.1f s, peak RSS %.0f MiB", rows, peer["wall_s"], peer["peak_rss_mib"])
    except RuntimeError as exc:
        log.warning("%d rows: the pandas peer failed: %s", rows, str(exc)[-300:])
        peer = None
    shutil.rmtree(data / "pandas", ignore_errors=True)
    validate = steps.pop("validate")  # the peer checks nothing: validate is reported beside the comparison
    kiln_s = sum(s["wall_s"] for s in steps.values())
    result = {"rows": rows, "steps": steps, "validate": validate, "kiln_rows_per_s": rows / kiln_s,
              "kiln_wall_s": kiln_s, "kiln_cpu_s": sum(s["cpu_s"] for s in steps.values()),
              "kiln_peak_rss_mib": max(s["peak_rss_mib"] for s in steps.values()), "peer": peer,
              "features": str(data / "build_features")}
    if peer is not None:
        result.update(pandas_rows_per_s=rows / peer["wall_s"], pandas_wall_s=peer["wall_s"],
                      pandas_cpu_s=peer["cpu_s"], pandas_peak_rss_mib=peer["peak_rss_mib"])
    return result


def _details(results: list[dict], train: dict | None, memory: MemorySampler) -> str:
    lines = ["| rows | side | ingest s / MiB | clean s / MiB | build_features s / MiB | rows/s | peak RSS MiB | "
             "validate s / MiB (not compared) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = " | ".join(f"{s['wall_s']:.1f} / {s['peak_rss_mib']:.0f}" for s in r["steps"].values())
        lines.append(f"| {r['rows']:,} | kiln | {cells} | {r['kiln_rows_per_s']:,.0f} (CPU {r['kiln_cpu_s']:.0f} s) | "
                     f"{r['kiln_peak_rss_mib']:.0f} | {r['validate']['wall_s']:.1f} / "
                     f"{r['validate']['peak_rss_mib']:.0f} |")
        if r["peer"] is None:
            lines.append(f"| {r['rows']:,} | pandas | failed (killed: out of memory?) | | | - | - | |")
        else:
            lines.append(f"| {r['rows']:,} | pandas | (one process: {r['pandas_wall_s']:.1f} s) | | | "
                         f"{r['pandas_rows_per_s']:,.0f} (CPU {r['pandas_cpu_s']:.0f} s) | "
                         f"{r['pandas_peak_rss_mib']:.0f} | |")
    if train is not None:
        lines.append(f"\nOne training epoch on the {results[-1]['rows']:,}-row features (1 rank, 2 threads, MLP 64-32, "
                     f"batch 4096): {train['wall_s']:.0f} s in all, {train['samples_per_s']:,.0f} samples/s, "
                     f"peak RSS {train['peak_rss_mib']:.0f} MiB.")
    lines.append(f"\nLowest MemAvailable during the run: {memory.min_available_mib:,.0f} MiB; most swap in use: "
                 f"{memory.max_swap_used_mib:.0f} MiB of {memory.swap_total_mib:.0f} MiB.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "kiln-bench-data_scale")
    parser.add_argument("--train", action="store_true", help="one training epoch on the largest size's features")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    results, train = [], None
    with MemorySampler() as memory:
        for rows in sorted(args.rows):
            results.append(measure(rows, args.folder))
        if args.train:
            with tempfile.TemporaryDirectory(dir=args.folder) as work:
                train = _run(TRAIN, results[-1]["features"], work)
    details = _details(results, train, memory)
    log.warning("\n%s", details)
    last = [r for r in results if r["peer"] is not None][-1]
    speed = last["kiln_rows_per_s"] / last["pandas_rows_per_s"]
    memory_ratio = last["kiln_peak_rss_mib"] / last["pandas_peak_rss_mib"]
    print(json.dumps({
        "name": "data_scale", "value": round(last["kiln_rows_per_s"], 1), "unit": "rows/s",
        "peer": f"plain pandas script, same file and operations, {last['rows']:,} rows x 50 columns (peak RSS kiln "
                f"{last['kiln_peak_rss_mib']:.0f} MiB vs {last['pandas_peak_rss_mib']:.0f} MiB = "
                f"{memory_ratio:.2f}x, target <= 0.5)",
        "peer_value": round(last["pandas_rows_per_s"], 1), "ratio": round(speed, 3), "target": ">= 1.0",
        "memory_ratio": round(memory_ratio, 3), "results": results, "train": train, "details": details}))


if __name__ == "__main__":
    main()
