"""monitor: one monitor run over 1 M captured rows: its wall time and peak RSS (target: peak RSS <= 2 GiB).

The monitor is the penguins example's (``dags/pipelines/penguins_species.yaml``: a 24-hour window, its drift and
quality thresholds, and the live check of its two declared expectations with Great Expectations), run as the
monitor DAG's task runs it: ``run_monitor(MonitorConfig.from_spec(spec, deployment file), store, now)``, except
that ``log_to_mlflow`` is False (the served version has no MLflow run here; logging the report folder is an upload
of a few files, not what grows with the rows).

Set up first, in this process and not measured, under a temporary folder:

* a bundle folder holding the champion's baseline, written by ``register``'s own
  :func:`kiln.tasks.bundle.baseline.write_baseline` from the 344 palmerpenguins rows (the raw rows, as ingest keeps
  them) and test predictions made up for it (probability 0.9 on the true species: no model is trained, since the
  monitor reads only the baseline), with its ``bundle.json`` hashes, and a deployment file serving it as version 1;
* ``--rows`` (default 1,000,000) captured rows in the model server's format
  (:mod:`kiln.tasks.serving.capture_format`, one record per request), published as ``--batches`` (default 100)
  batches spread over the 24 hours of the window into a local artifact store, as the server publishes them:
  penguins rows drawn with replacement, numeric inputs with 2 % noise (in distribution: no drift is expected),
  the predicted class right 97 % of the time;
* feedback (labels) for 10 % of the requests, one batch per hour, ten minutes after their requests.

Then a fresh Python process imports kiln and runs the monitor once; it reports the monitor call's wall time, its
own start-up and imports, and ``ru_maxrss`` (peak RSS, the imports included). The JSON line's value is the peak
RSS; there is no peer (no other tool here reads kiln's capture format; a plain pandas script over the same files
would skip the drift tests, the validation and the report), so ``peer`` is null and the ratio is peak RSS / 2 GiB
(target <= 1.0). Wall time, rows read and the report's verdict are in ``note``, with, for scale, a fresh process
that only reads the same files into pandas (``read_only``: the floor of any monitor that loads its window).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from _common import REPO, isolated_environ

SPEC = REPO / "dags" / "pipelines" / "penguins_species.yaml"
PIPELINE, VERSION, TARGET = "penguins_species", "1", "species"
NUMERIC = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]
INPUTS = ["island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "sex", "year"]
#: The window's end: the monitor runs "now" = END and reads [END - 24 h, END).
END = datetime(2026, 12, 7, 4, 0, tzinfo=UTC)
WINDOW_H = 24
FEEDBACK_SHARE, NOISE, ACCURACY = 0.1, 0.02, 0.97
TARGET_RSS_GIB = 2.0
log = logging.getLogger("monitor")

#: The measured process: argv = spec, deployment file, store folder, now (ISO); prints one JSON line.
CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from kiln.tasks.monitoring.run import MonitorConfig, run_monitor
from kiln.tasks.spec import load_spec
from kiln.tasks.storage.artifacts import LocalArtifactStore
spec, deployment, store, now = sys.argv[1:5]
config = replace(MonitorConfig.from_spec(load_spec(Path(spec)), Path(deployment)), log_to_mlflow=False)
imported_s, imported_rss = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t1 = time.perf_counter()
outcome = run_monitor(config, LocalArtifactStore(Path(store)), datetime.fromisoformat(now))
monitor_s = time.perf_counter() - t1
report = json.loads((LocalArtifactStore(Path(store)).path(outcome.report_key) / "report.json").read_text())
checks = (report["validation"] or {}).get("expectations", [])
print(json.dumps({"monitor_s": monitor_s, "imports_s": imported_s,
                  "imports_rss_mib": imported_rss / 1024,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rows": outcome.latest["rows"], "breach": outcome.breach, "summary": outcome.summary,
                  "report_key": outcome.report_key, "files_read": report["files"]["read"],
                  "files_skipped": len(report["files"]["skipped"]), "expectations_checked": len(checks),
                  "expectations_passed": sum(bool(c["success"]) for c in checks)}))
"""

#: The floor, for scale (not a peer: it judges nothing): the same files read into pandas, nothing else.
FLOOR = """
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
import pyarrow as pa, pyarrow.parquet as pq
store = Path(sys.argv[1])
frames = [pa.concat_tables([pq.read_table(f) for f in sorted(store.rglob(name))], promote_options="permissive")
          .to_pandas() for name in ("capture.parquet", "feedback.parquet")]
print(json.dumps({"read_s": time.perf_counter() - t0, "rows": len(frames[0]),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def penguins() -> pd.DataFrame:
    """The 344 palmerpenguins rows, as the example spec's source reads them."""
    import importlib.resources

    return pd.read_csv(importlib.resources.files("palmerpenguins") / "data" / "penguins.csv")


def write_bundle(folder: Path, rows: pd.DataFrame) -> Path:
    """A bundle folder holding only the baseline (and ``bundle.json`` listing its files); returns it."""
    from kiln.tasks.bundle.baseline import BaselineConfig, write_baseline
    from kiln.tasks.bundle.files import MANIFEST_FILE
    from kiln.tasks.storage.artifacts import file_sha256, write_json

    bundle = folder / "bundle"
    bundle.mkdir(parents=True)
    rows.to_parquet(folder / "ingest.parquet", index=False)
    classes = sorted(rows[TARGET].unique())
    probs = np.full((len(rows), len(classes)), 0.05, dtype=np.float32)
    probs[np.arange(len(rows)), rows[TARGET].map(classes.index).to_numpy()] = 0.9
    np.save(folder / "predictions.npy", probs)
    write_baseline(BaselineConfig(folder / "ingest.parquet", folder / "predictions.npy",
                                  {"accuracy": ACCURACY, "macro_f1": 0.96}, "accuracy", seed=0),
                   bundle, INPUTS, classes)
    write_json(bundle / MANIFEST_FILE, {"files": {p.name: file_sha256(p) for p in bundle.iterdir()}})
    return bundle


def capture_batch(rows: pd.DataFrame, rng: np.random.Generator, n: int, first: int, hour: datetime) -> pd.DataFrame:
    """``n`` captured records (one per request, ids ``first`` ..) received within ``hour``: the server's columns."""
    pick = rows.iloc[rng.integers(0, len(rows), n)].reset_index(drop=True)
    out = pd.DataFrame({
        "request_id": [f"{i:032x}" for i in range(first, first + n)],
        "record": np.zeros(n, np.int32),
        "received_at": pd.to_datetime(hour) + pd.to_timedelta(np.sort(rng.uniform(0, 3600, n)), unit="s"),
        "version": VERSION, "variant": "champion"})
    for name in INPUTS:
        if name in NUMERIC:
            out[name] = pick[name].to_numpy(np.float64) * (1 + NOISE * rng.standard_normal(n))
        else:
            out[name] = [None if pd.isna(v) else str(v) for v in pick[name]]
    right = rng.random(n) < ACCURACY
    classes = np.asarray(sorted(rows[TARGET].unique()), dtype=object)
    wrong = classes[(pick[TARGET].map(list(classes).index).to_numpy() + 1) % len(classes)]
    out["predicted_class"] = np.where(right, pick[TARGET].to_numpy(dtype=object), wrong)
    out["predicted_value"] = rng.uniform(0.5, 1.0, n)
    out[TARGET] = pick[TARGET].to_numpy(dtype=object)  # the truth, for the feedback; not published
    return out


def publish(store: object, key: str, filename: str, frame: pd.DataFrame) -> None:
    """Publish one batch folder as the model server does (``store.writer``: temporary name, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    at = table.column_names.index("received_at")  # the server writes microseconds, UTC
    table = table.set_column(at, "received_at", table["received_at"].cast(pa.timestamp("us", "UTC"), safe=False))
    with store.writer(key) as folder:  # type: ignore[attr-defined]
        pq.write_table(table, folder / filename)


def publish_traffic(store_dir: Path, rows: pd.DataFrame, n_rows: int, batches: int) -> dict[str, int]:
    """Publish ``n_rows`` captured records in ``batches`` batches over the window, and labels for a share of them."""
    from kiln.tasks.serving.capture_format import capture_key, feedback_key, hour_of
    from kiln.tasks.storage.artifacts import LocalArtifactStore

    store, rng = LocalArtifactStore(store_dir), np.random.default_rng(0)
    start = END - timedelta(hours=WINDOW_H)
    feedback: dict[str, list[pd.DataFrame]] = {}
    done = 0
    for b in range(batches):
        n = n_rows // batches + (1 if b < n_rows % batches else 0)
        hour = start + timedelta(hours=b * WINDOW_H // batches)
        batch = capture_batch(rows, rng, n, done, hour)
        batch_id = f"{hour:%Y%m%dT%H%M%S}-0bench00-{b:06d}"
        publish(store, capture_key(PIPELINE, VERSION, hour_of(hour.timestamp()), batch_id), "capture.parquet",
                batch.drop(columns=[TARGET]))
        labelled = batch[rng.random(n) < FEEDBACK_SHARE]
        received = (labelled["received_at"] + pd.Timedelta(minutes=10)).clip(upper=END - pd.Timedelta(seconds=1))
        fb = pd.DataFrame({"request_id": labelled["request_id"], "record": labelled["record"],
                           "label": labelled[TARGET].astype(str), "received_at": received})
        for h, part in fb.groupby(received.dt.floor("h")):
            feedback.setdefault(hour_of(h.timestamp()), []).append(part)
        done += n
    labels = 0
    for h, parts in feedback.items():
        frame = pd.concat(parts, ignore_index=True)
        publish(store, feedback_key(PIPELINE, h, f"{h.replace('-', '')}0000-0bench00-000001"), "feedback.parquet",
                frame)
        labels += len(frame)
    return {"captured": done, "capture_batches": batches, "labels": labels, "feedback_batches": len(feedback)}


def run_child(env: dict[str, str], code: str, *argv: str) -> dict:
    """Run ``code`` once in a fresh process; its last JSON line plus the process's whole wall time."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the measured process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="captured rows (default %(default)s)")
    parser.add_argument("--batches", type=int, default=100, help="captured batches (default %(default)s)")
    args = parser.parse_args(argv)
    if args.rows < args.batches or args.batches < 1:
        parser.error("--batches must be >= 1 and --rows >= --batches")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from kiln.tasks.serving.deployment import Deployment, ModelRef, write_deployment

    with tempfile.TemporaryDirectory(prefix="kiln-bench-monitor-") as name:
        tmp = Path(name)
        env = isolated_environ(tmp / "home", KILN_ARTIFACT_ROOT=str(tmp / "store"))
        rows = penguins()
        t0 = time.perf_counter()
        bundle = write_bundle(tmp, rows)
        deployment = tmp / "serving" / "deployment.json"
        write_deployment(deployment, Deployment(model=PIPELINE, champion=ModelRef(VERSION, str(bundle))))
        published = publish_traffic(tmp / "store", rows, args.rows, args.batches)
        setup_s = time.perf_counter() - t0
        log.warning("published %s in %.1f s; running the monitor", published, setup_s)
        r = run_child(env, CHILD, str(SPEC), str(deployment), str(tmp / "store"), END.isoformat())
        floor = run_child(env, FLOOR, str(tmp / "store"))
    log.warning("monitor: %s", json.dumps(r))
    if r["rows"] != published["captured"]:
        raise RuntimeError(f"the monitor read {r['rows']} rows of the {published['captured']} published")
    note = (f"{r['rows']:,} captured rows in {published['capture_batches']} batches over {WINDOW_H} h, "
            f"{published['labels']:,} labels in {published['feedback_batches']} batches ({r['files_read']} files "
            f"read, {r['files_skipped']} skipped; {r['expectations_passed']} of {r['expectations_checked']} live "
            f"expectations passed); run_monitor "
            f"{r['monitor_s']:.1f} s wall (the process {r['process_s']:.1f} s, imports {r['imports_s']:.1f} s), "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB ({r['imports_rss_mib']:.0f} MiB after the imports); "
            f"breach {r['breach']}: {r['summary']}; for scale, reading the same files into pandas and nothing else: "
            f"{floor['read_s']:.1f} s, peak RSS {floor['peak_rss_mib']:.0f} MiB")
    print(json.dumps({"name": "monitor", "value": round(r["peak_rss_mib"], 1), "unit": "MiB peak RSS", "peer": None,
                      "peer_value": None, "ratio": round(r["peak_rss_mib"] / (TARGET_RSS_GIB * 1024), 3),
                      "target": "<= 1.0", "wall_s": round(r["monitor_s"], 2), "note": note,
                      "published": published, "run": r, "read_only": floor}), flush=True)


if __name__ == "__main__":
    main()
