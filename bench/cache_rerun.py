"""cache_rerun: a rerun with only ``epochs`` changed (the step cache reuses ingest, clean and build_features) vs the
full run of the same settings with the cache off (``use_cache: false``).

A synthetic classification CSV (``--rows`` rows: 20 numeric columns with a few missing values, 3 categorical, a
label) in a private ``KILN_HOME``. A first run (``epochs`` 1) fills the cache; then, ROUNDS times in turn, the
cached rerun (``epochs`` 2) and the full run (``epochs`` 2, ``use_cache: false``), each in a fresh process running
ingest -> validate -> clean -> build_features -> train through the step cache (what the DAG's tasks run; validate
is never cached). Best of each side; ratio = the median of the rounds' rerun / full seconds (the machine's speed
drifts), target <= 0.8. The details table has each step's seconds, cache outcome and peak RSS from the last round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, isolated_environ  # noqa: E402

ROUNDS = 3
CACHED = ("ingest", "clean", "build_features")
RUN = """
import json, sys, time
from kiln.tasks.pipeline import keys
from kiln.tasks.pipeline.context import make_context
from kiln.tasks.pipeline.step_cache import run_step
from kiln.tasks.pipeline.steps import STEPS
t0 = time.perf_counter()
ctx = make_context(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
steps = {}
for step in STEPS:
    t = time.perf_counter()
    r = run_step(step, ctx)
    steps[step.name] = {"s": round(time.perf_counter() - t, 2), "cache": r["cache"].split(":")[0],
                        "rss": r["peak_rss_mib"]}
    if step.name == keys.TRAIN:
        break
print(json.dumps({"duration_s": time.perf_counter() - t0, "steps": steps}))
"""


def write_data(folder: Path, rows: int) -> Path:
    """The CSV and its spec (2 ranks x 1 thread, batch 512); returns the spec file."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 20)).round(4)
    df = pd.DataFrame(x, columns=[f"n{i}" for i in range(20)])
    df.loc[rng.random(rows) < 0.01, "n3"] = np.nan
    for i in range(3):
        df[f"c{i}"] = rng.choice([f"k{j}" for j in range(8)], size=rows)
    df["label"] = np.where(x[:, 0] + x[:, 1] - x[:, 2] > 0, "yes", "no")
    df.to_csv(folder / "data.csv", index=False)
    spec = folder / "cache_bench.yaml"
    spec.write_text(yaml.safe_dump({"name": "cache_bench", "source": {"uri": "data.csv"}, "target": "label",
                                    "task": "classification",
                                    "training": {"nproc": 2, "batch_size": 512}}))
    return spec


def run(spec: Path, run_id: str, params: dict, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUN, str(spec), run_id, json.dumps(params)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run {run_id} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=300_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-cache-") as tmp:
        home = Path(tmp) / "home"
        spec = write_data(Path(tmp), args.rows)
        env = isolated_environ(home)
        run(spec, "fill", {"epochs": 1}, env)
        rerun, full = [], []
        for i in range(ROUNDS):
            rerun.append(run(spec, f"rerun_{i}", {"epochs": 2}, env))
            full.append(run(spec, f"full_{i}", {"epochs": 2, "use_cache": False}, env))
    best_rerun, best_full = (min(r["duration_s"] for r in runs) for runs in (rerun, full))
    rows = [f"| {name} | {rerun[-1]['steps'][name]['s']} s ({rerun[-1]['steps'][name]['cache']}, "
            f"{rerun[-1]['steps'][name]['rss']:.0f} MiB) | {full[-1]['steps'][name]['s']} s "
            f"({full[-1]['steps'][name]['rss']:.0f} MiB) |" for name in full[-1]["steps"]]
    details = "\n".join([f"{args.rows} rows x 24 columns; seconds per step of the last round (cache outcome, peak "
                         "RSS of the process so far)", "",
                         "| step | rerun, epochs only changed | full run, cache off |", "|---|---|---|", *rows])
    rerun_s = ", ".join(f"{r['duration_s']:.1f}" for r in rerun)
    full_s = ", ".join(f"{r['duration_s']:.1f}" for r in full)
    cached = {side: sum(runs[-1]["steps"][name]["s"] for name in CACHED) for side, runs in (("rerun", rerun),
                                                                                           ("full", full))}
    # The machine's speed drifts between runs: the ratio is the median of the rounds' rerun / full pairs.
    ratio = statistics.median(r["duration_s"] / f["duration_s"] for r, f in zip(rerun, full, strict=True))
    print(json.dumps({"name": "cache_rerun", "value": round(best_rerun, 3), "unit": "s",
                      "peer": f"the same run with use_cache: false ({args.rows} rows x 24 columns, ingest -> train, "
                              f"2 ranks, 2 epochs, best of {ROUNDS}; reruns {rerun_s} s, full runs {full_s} s; "
                              f"ingest + clean + build_features {cached['rerun']:.2f} s vs {cached['full']:.2f} s; "
                              "ratio: median of the rounds' pairs)",
                      "peer_value": round(best_full, 3), "ratio": round(ratio, 3), "target": "<= 0.8",
                      "details": details}))

if __name__ == "__main__":
    main()
