"""batch_scoring: rows/s of kiln's batch scoring against a plain PyTorch loop over the same bundle and file.

The model is the penguins example pipeline's MLP (``dags/pipelines/penguins_species.yaml``), trained by running the
pipeline in this process under a temporary ``KILN_HOME`` (``serving.train_penguins``) and exported as a bundle. The
input is the run's raw test rows without the label, repeated to ``--rows`` rows (default 1,000,000) and written as
one Parquet file by pandas. Both sides use the same batch size (``scoring.batch_size``, 65,536) on every core, and
each round checks that both scored every row. Two comparisons, each measured in pairs:

* (a) the scoring path, the headline: the steps after ``prepare`` and ``validate`` as
  :func:`kiln.tasks.scoring.run.run_score` runs them in process, on an input staged once before the rounds
  (``prepare`` finds it and reuses it): the bundle loaded (``load_bundle``, runtime ``auto``: ONNX Runtime where
  the bundle has ``model.onnx``), ``partition`` (``--partition-rows``, default 250,000), ``score`` of every
  partition in turn (its row groups read, its rows checked for rejects, the bundle's transform and runtime,
  predictions and rejects written as Parquet and hashed) and ``commit`` (files copied into the run's output, the
  manifest written). Peer: the plain loop (below) reading that same staged ``snapshot.parquet``.
* (b) the whole run from the input file: ``run_score`` of a new run id each round, so it also stages the input
  (``prepare``: ingest's readers into a snapshot, hashed, its schema checked) and checks it with the pipeline's
  expectation suite (``validate``, Great Expectations). Peer: the plain loop reading the original input file.

The plain loop: ``torch.export.load`` of the bundle's ``model.pt2`` and its ``feature_spec.json``,
``pd.read_parquet`` of the file's model columns, then per batch ``FeatureTransform.transform`` and the program
under ``torch.inference_mode``, and one Parquet file of the row ordinals, the label (categorical) and the class
probabilities. No row checks, rejects, partitions, hashes, manifest or suite.

Each round runs the four timings, kiln first in odd rounds and the plain loop first in even ones; a ratio is
kiln's rows/s over the plain loop's within one round, and each comparison reports the median of its rounds'
ratios (the machine's speed drifts between rounds). The result line is comparison (a); (b), the per-round ratios
and (a) again with kiln on the torch runtime (the peer's, to show what ONNX Runtime is worth) are in its ``peer``
text and ``details`` (``bench/results/batch_scoring.md``). Target: ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from _common import REPO, isolated_environ
from serving import export_bundle_of_run, train_penguins

SPEC = REPO / "dags" / "pipelines" / "penguins_species.yaml"
TARGET_COLUMN = "species"
TARGET = 0.9
#: The timed sides of a round, in kiln-first order: (a) kiln, (a) plain, (b) kiln, (b) plain, (a) kiln on torch.
SIDES = ("kiln", "plain", "kiln_whole", "plain_whole", "kiln_torch")


def write_input(features_dir: Path, out: Path, rows: int) -> Path:
    """The run's raw test rows without the label, repeated to ``rows`` rows, as one Parquet file."""
    from kiln.tasks.features.splits import TEST_RAW_FILE

    test = pd.read_parquet(features_dir / TEST_RAW_FILE).drop(columns=[TARGET_COLUMN])
    repeats = np.resize(np.arange(len(test)), rows)
    test.iloc[repeats].reset_index(drop=True).to_parquet(out, index=False)
    return out


def plain_loop(bundle: Path, file: Path, out: Path, batch_size: int) -> int:
    """Score ``file`` with the bundle's exported program in a plain loop; returns the rows written."""
    import torch

    from kiln.tasks.features.transform import FeatureTransform

    program = torch.export.load(str(bundle / "model.pt2")).module()
    transform = FeatureTransform.load(bundle / "feature_spec.json")
    df = pd.read_parquet(file, columns=transform.input_columns)
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(df), batch_size):
            x = transform.transform(df.iloc[start:start + batch_size])
            outputs.append(program(torch.from_numpy(x)).numpy())
    y = np.concatenate(outputs)
    classes = list(transform.classes or ())
    table = pd.DataFrame({"row": np.arange(len(df)), "label": pd.Categorical.from_codes(y.argmax(1), classes),
                          **{f"probability_{c}": y[:, i] for i, c in enumerate(classes)}})
    table.to_parquet(out, index=False)
    return len(table)


def timed(run: Callable[[], int], rows: int) -> float:
    """Seconds of ``run``, which must return ``rows`` (every row scored)."""
    t0 = time.perf_counter()
    done = run()
    seconds = time.perf_counter() - t0
    assert done == rows, f"scored {done} of {rows} rows"
    return seconds


def details(rounds: list[dict[str, float]], rows: int, prepare_s: float, validate_s: float) -> str:
    """Every round's seconds and ratios as a markdown table, and the staging and suite times of the input."""
    lines = ["| round | first | (a) kiln s | (a) plain s | (a) ratio | (b) kiln s | (b) plain s | (b) ratio | "
             "(a) kiln, torch runtime s | its ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rounds, 1):
        lines.append(f"| {i} | {'kiln' if i % 2 else 'plain'} | {r['kiln']:.3f} | {r['plain']:.3f} | "
                     f"{r['plain'] / r['kiln']:.3f} | {r['kiln_whole']:.3f} | {r['plain_whole']:.3f} | "
                     f"{r['plain_whole'] / r['kiln_whole']:.3f} | {r['kiln_torch']:.3f} | "
                     f"{r['plain'] / r['kiln_torch']:.3f} |")
    lines.append(f"\n{rows:,} rows; ratio = kiln rows/s / plain rows/s in the same round. Staging the input "
                 f"(prepare) took {prepare_s:.2f} s and checking it with the suite (validate) {validate_s:.2f} s "
                 "before the rounds; (b) pays both every round.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--partition-rows", type=int, default=250_000)
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default %(default)s)")
    args = parser.parse_args()
    if args.repeat < 1 or args.rows < 1:
        parser.error("--repeat and --rows must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-scoring-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ.update(isolated_environ(tmp / "home"))
        from kiln.tasks.scoring import run as steps
        from kiln.tasks.scoring.config import ScoreConfig
        from kiln.tasks.scoring.model import ScoringModel
        from kiln.tasks.spec import load_spec
        from kiln.tasks.storage.artifacts import LocalArtifactStore

        features_dir, model_dir = train_penguins(tmp / "home")
        bundle = export_bundle_of_run(tmp, features_dir, model_dir)
        (tmp / "home" / "data").mkdir(parents=True, exist_ok=True)
        source = write_input(features_dir, tmp / "home" / "data" / "batch.parquet", args.rows)
        spec = load_spec(SPEC)
        config = ScoreConfig.from_spec(spec, {"input": {"uri": str(source)}, "partition_rows": args.partition_rows})
        on_torch = dataclasses.replace(config, runtime="torch")
        store, model = LocalArtifactStore(tmp / "store"), ScoringModel(version="1", bundle=str(bundle))

        t0 = time.perf_counter()
        steps.prepare(config, store, "staged", model)
        prepare_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        steps.validate(spec, config, store, "staged")
        validate_s = time.perf_counter() - t0
        snapshot = store.path(f"{spec.name}/_scoring/staged/input") / "snapshot.parquet"

        def sides(whole_run: str) -> dict[str, Callable[[], int]]:
            # The staged input is reused (prepare returns it); partitions, parts and output are written again.
            return {
                "kiln": lambda: steps.run_score(spec, config, store, "staged", model=model,
                                                validate_input=False).scored,
                "plain": lambda: plain_loop(bundle, snapshot, tmp / "plain.parquet", config.batch_size),
                "kiln_whole": lambda: steps.run_score(spec, config, store, whole_run, model=model).scored,
                "plain_whole": lambda: plain_loop(bundle, source, tmp / "plain.parquet", config.batch_size),
                "kiln_torch": lambda: steps.run_score(spec, on_torch, store, "staged", model=model,
                                                      validate_input=False).scored,
            }

        # One untimed call of each side first: the first torch.export.load or suite run in a process pays imports.
        for run in sides("warm-up").values():
            timed(run, args.rows)
        rounds: list[dict[str, float]] = []
        for i in range(args.repeat):
            order = SIDES if i % 2 == 0 else ("plain", "kiln", "plain_whole", "kiln_whole", "kiln_torch")
            calls = sides(f"whole-{i}")
            rounds.append({side: timed(calls[side], args.rows) for side in order})
            r = rounds[-1]
            print(f"round {i + 1}: (a) kiln {r['kiln']:.3f} s, plain {r['plain']:.3f} s, ratio "
                  f"{r['plain'] / r['kiln']:.3f}; (b) kiln {r['kiln_whole']:.3f} s, plain {r['plain_whole']:.3f} s, "
                  f"ratio {r['plain_whole'] / r['kiln_whole']:.3f}; (a) on torch {r['kiln_torch']:.3f} s",
                  flush=True)

        def median(side: str) -> float:
            return statistics.median(r[side] for r in rounds)

        ratios = {name: [r[peer] / r[ours] for r in rounds] for name, ours, peer in (
            ("a", "kiln", "plain"), ("b", "kiln_whole", "plain_whole"), ("torch", "kiln_torch", "plain"))}
        ratio = {name: statistics.median(values) for name, values in ratios.items()}
        listed = {name: ", ".join(f"{x:.3f}" for x in values) for name, values in ratios.items()}
        peer = (f"(a) scoring path (partition + score + commit, bundle load included) vs a plain PyTorch loop over "
                f"the same bundle reading the same staged snapshot; the ratio is (a): median of {args.repeat} "
                f"paired rounds ({listed['a']}). (b) whole run from the input file (prepare + validate + partition "
                f"+ score + commit) vs the plain loop reading the input file: {args.rows / median('kiln_whole'):,.0f}"
                f" vs {args.rows / median('plain_whole'):,.0f} rows/s, ratio {ratio['b']:.3f} ({listed['b']}). (a) "
                f"with kiln on the torch runtime: ratio {ratio['torch']:.3f}. Kiln's runtime: auto (ONNX Runtime)")
        print(json.dumps({"name": "batch_scoring", "value": round(args.rows / median("kiln"), 3), "unit": "rows/s",
                          "peer": peer, "peer_value": round(args.rows / median("plain"), 3),
                          "ratio": round(ratio["a"], 3), "target": f">= {TARGET}", "comparison": "a",
                          "whole_run": {"value": round(args.rows / median("kiln_whole"), 3),
                                        "peer_value": round(args.rows / median("plain_whole"), 3),
                                        "ratio": round(ratio["b"], 3)},
                          "details": details(rounds, args.rows, prepare_s, validate_s)}), flush=True)


if __name__ == "__main__":
    main()
