"""Run every benchmark in ``bench/`` and append one row per result to ``BENCHMARKS.md``.

Each benchmark is a script whose last printed line is a JSON object
``{"name", "value", "unit", "peer", "peer_value", "ratio", "target"}``. Rows are appended, so the file keeps
the history of every run; each row names its command, its peer measured in the same run, and the date. A result
may add ``details`` (a markdown table of every measured cell): it is written to ``bench/results/<name>.md``,
replacing the previous run's. A benchmark with no fair peer gives ``peer`` and ``peer_value`` null, a ``ratio``
against its target bound and a ``note``. A benchmark that cannot run on this machine (``gpu_training`` without a
CUDA GPU) prints ``{"name", "skipped": reason}`` instead and gets no row.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
OUT = BENCH.parent / "BENCHMARKS.md"
#: Benchmarks that are a second run of a script with arguments: name -> (script, arguments).
VARIANTS = {"train_harness_user_loop": ("train_harness.py", ["--compare", "user-loop"]),
            "serving_runtimes": ("serving.py", ["--runtimes", "--repeat", "5"]),
            "serving_capture": ("serving.py", ["--capture", "--repeat", "5"])}
HEADER = """# Benchmarks

Written by `make bench` (`bench/run_all.py`); one row per benchmark run, newest at the bottom. Figures are
from a 2-core machine without a GPU unless the row says otherwise. Ratios compare with a peer measured in the
same run.

| date | benchmark | command | result | peer | ratio | target | met |
|---|---|---|---|---|---|---|---|
"""


def _met(ratio: float, target: str) -> str:
    op, _, num = target.partition(" ")
    bound = float(num)
    return "yes" if (ratio <= bound if op == "<=" else ratio >= bound) else "NO"


def run_one(script: Path, args: list[str] | None = None) -> dict:
    """Run one benchmark script; return its JSON result (raises if it fails or prints no JSON)."""
    proc = subprocess.run([sys.executable, str(script), *(args or [])], cwd=BENCH.parent, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    args = parser.parse_args()
    runs: list[tuple[str, Path, list[str]]] = [
        (p.stem, p, []) for p in BENCH.glob("*.py") if not p.name.startswith(("_", "run_all"))]
    runs = sorted(runs + [(name, BENCH / script, argv) for name, (script, argv) in VARIANTS.items()],
                  key=lambda run: run[0])
    if args.names:
        runs = [run for run in runs if run[0] in args.names]
    if not OUT.exists():
        OUT.write_text(HEADER)
    failed = 0
    for _, script, argv in runs:
        command = " ".join([f"python bench/{script.name}", *argv])
        print(f"running {command} ...", flush=True)
        try:
            r = run_one(script, argv)
        except (RuntimeError, json.JSONDecodeError, IndexError) as exc:
            print(f"  FAILED: {exc}", flush=True)
            failed += 1
            continue
        if r.get("skipped"):
            print(f"  skipped: {r['skipped']}", flush=True)
            continue
        # A benchmark without a fair peer (``monitor``: a bound, not a comparison) says so and why in ``note``.
        peer = (f"{r['peer']}: {r['peer_value']:.4g} {r['unit']}" if r.get("peer") is not None
                else f"no peer ({r.get('note', 'ratio against the target bound')})")
        row = (f"| {dt.date.today().isoformat()} | {r['name']} | `{command}` | "
               f"{r['value']:.4g} {r['unit']} | {peer} | "
               f"{r['ratio']:.3f} | {r['target']} | {_met(r['ratio'], r['target'])} |\n")
        with OUT.open("a") as fh:
            fh.write(row)
        if r.get("details"):
            details = BENCH / "results" / f"{r['name']}.md"
            details.parent.mkdir(exist_ok=True)
            details.write_text(f"# {r['name']}: every cell of the {dt.date.today().isoformat()} run\n\n"
                               f"`{command}` (row in BENCHMARKS.md)\n\n{r['details']}\n")
        print("  " + row.strip(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
