"""pipeline_overhead: the penguins pipeline through Airflow vs the same ``tasks`` functions in one process.

Both runs use the same spec, data and settings; each gets its own fresh state folder. The Airflow run is
``dag.test()`` (real metadata DB, task instances and XCom, tasks in-process); the peer is
``tasks.pipeline.run_all``. Ratio = Airflow seconds / plain seconds; target <= 1.3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF = {"epochs": 30}

AIRFLOW_RUN = """
import json, sys
from operators.cli import run_dag
r = run_dag("penguins_species", json.loads(sys.argv[1]))
assert r["state"] == "success", r
print(json.dumps({"duration_s": r["duration_s"]}))
"""

PLAIN_RUN = """
import json, sys, time
from tasks import pipeline
t0 = time.perf_counter()
ctx = pipeline.make_context("dags/pipelines/penguins_species.yaml", f"bench_plain_{time.time_ns()}",
                             json.loads(sys.argv[1]))
pipeline.run_all(ctx)
print(json.dumps({"duration_s": time.perf_counter() - t0}))
"""


def _run(code: str, home: Path) -> float:
    env = {**os.environ, "KILN_HOME": str(home), "AIRFLOW_HOME": str(home / "airflow"),
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "GX_ANALYTICS_ENABLED": "false", "MPLBACKEND": "Agg"}
    env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", None)
    if "run_dag" in code:
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                       capture_output=True)
    out = subprocess.run([sys.executable, "-c", code, json.dumps(CONF)], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["duration_s"])


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        # Warm both paths once (MLflow DB migrations, first imports), then time one run each.
        for name in ("warm_plain", "warm_airflow"):
            _run(PLAIN_RUN if "plain" in name else AIRFLOW_RUN, Path(tmp) / name)
        plain = _run(PLAIN_RUN, Path(tmp) / "warm_plain")
        airflow = _run(AIRFLOW_RUN, Path(tmp) / "warm_airflow")
    print(json.dumps({"name": "pipeline_overhead", "value": round(airflow, 3), "unit": "s",
                      "peer": "same tasks/ functions in one process", "peer_value": round(plain, 3),
                      "ratio": round(airflow / plain, 3), "target": "<= 1.3"}))


if __name__ == "__main__":
    main()
