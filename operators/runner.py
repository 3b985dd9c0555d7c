"""Run a pipeline DAG through Airflow in this process and report the outcome.

    kiln run penguins_species [--conf '{"epochs": 5}']        (python -m kiln.operators.runner ...)

Runs the DAG with ``dag.test()`` (real Airflow: metadata DB, task instances, XCom, retries off), prints a short
human summary, and as its very last line one JSON object with ``dag_id``, ``run_id``, ``state``, ``metrics``,
``mlflow_run_id``, ``duration_s``. Exits non-zero when the run did not succeed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


#: Task states of a task that never ran (the failure of a task upstream stopped the run).
NOT_RUN_STATES = frozenset({"upstream_failed", "none", "None", "scheduled", "queued", "removed"})


def ensure_migrated() -> None:
    """Set Airflow's metadata DB up on first use (a fresh ``KILN_HOME`` or ``AIRFLOW_HOME``), or bring it up to
    date; a DB that is up to date costs one query."""
    from airflow.utils.db import check_migrations, upgradedb

    try:
        check_migrations(timeout=1)
    except TimeoutError:
        log.info("setting up Airflow's metadata database (first use of this AIRFLOW_HOME)")
        upgradedb()


def run_dag(dag_id: str, conf: dict[str, Any]) -> dict[str, Any]:
    """Run ``dag_id`` once with ``conf`` and summarise it: each task's state, the first failure and its message,
    the tasks that never ran, metrics, the gate's decision and where the model is served.

    Raises:
        KeyError: no such DAG (the message lists the DAGs that exist and any import errors).
    """
    from airflow.dag_processing.dagbag import DagBag
    from airflow.settings import DAGS_FOLDER

    from kiln.operators.step import ERROR_KEY

    ensure_migrated()
    bag = DagBag(dag_folder=DAGS_FOLDER)
    if dag_id not in bag.dags:
        errors = "".join(f"\n  {path}: {_last_line(err)}" for path, err in bag.import_errors.items())
        raise KeyError(f"no DAG '{dag_id}' in {DAGS_FOLDER}; DAGs: {', '.join(sorted(bag.dag_ids)) or 'none'}"
                       + (f"\nimport errors:{errors}" if errors else ""))
    dag = bag.dags[dag_id]
    t0 = time.perf_counter()
    dr = dag.test(run_conf=conf)
    duration = time.perf_counter() - t0
    tis = {ti.task_id: ti for ti in dr.get_task_instances()}
    states = {tid: str(tis[tid].state) if tid in tis else "none" for tid in dag.task_dict}  # in step order

    def output(task_id: str, key: str = "return_value") -> Any:
        return tis[task_id].xcom_pull(task_ids=task_id, key=key) if task_id in tis else None

    failed = [t for t, s in states.items() if s == "failed"]
    error = {"task": failed[0], "message": output(failed[0], ERROR_KEY) or "no message recorded; see the log"} \
        if failed else None
    evaluated, trained, gated, deployed = output("evaluate"), output("train"), output("gate"), output("deploy")
    return {
        "dag_id": dag_id,
        "run_id": dr.run_id,
        "state": str(dr.state),
        "tasks": states,
        "failed_tasks": failed,
        "not_run": [t for t, s in states.items() if s in NOT_RUN_STATES],
        "error": error,
        "metrics": (evaluated or {}).get("metrics", {}),
        "thresholds": (evaluated or {}).get("threshold_checks", {}),
        "mlflow_run_id": (evaluated or trained or {}).get("mlflow_run_id") or _mlflow_run(dag_id, dr.run_id),
        "gate": {k: gated[k] for k in ("decision", "reason", "candidate")} if gated else None,
        "served": {"url": deployed.get("url"), "version": deployed.get("version")}
        if deployed and deployed.get("url") else None,
        "duration_s": round(duration, 2),
    }


def _last_line(traceback_text: str) -> str:
    """The exception line of an import error's traceback (its message, not the frames)."""
    lines = [line for line in traceback_text.strip().splitlines() if line.strip()]
    start = next((i for i in range(len(lines) - 1, -1, -1) if not lines[i].startswith((" ", "\t"))), 0)
    return " ".join(line.strip() for line in lines[start:])


def _mlflow_run(pipeline: str, airflow_run_id: str) -> str | None:
    """The run's MLflow run, if a step created one (``validate`` does) before the run stopped."""
    from mlflow.tracking import MlflowClient

    from kiln.tasks.settings import get_settings
    from kiln.tasks.storage.artifacts import run_key
    from kiln.tasks.tracking.runs import run_of

    client = MlflowClient(get_settings().mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(pipeline)
    return run_of(client, experiment.experiment_id, run_key(pipeline, airflow_run_id)) if experiment else None


@contextlib.contextmanager
def _output_to(log_path: Path) -> Iterator[None]:
    """Send this process's stdout/stderr (Airflow's own logs, task output) to ``log_path`` at the fd level."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _print_summary(result: dict[str, Any]) -> None:
    from kiln.tasks.settings import get_settings

    s = get_settings()
    lines = [f"Pipeline {result['dag_id']}: {result['state']} in {result['duration_s']:.1f} s "
             f"(run {result['run_id']})"]
    if result["error"]:
        message = str(result["error"]["message"]).splitlines() or [""]
        lines.append(f"  failed at       {result['error']['task']}: {message[0]}")
        lines += [f"                  {line}" for line in message[1:]]
    lines += [f"  {tid:<15} {state}" for tid, state in result["tasks"].items() if tid not in result["not_run"]]
    if result["not_run"]:
        lines.append(f"  not run         {', '.join(result['not_run'])}")
    for name, value in sorted(result["metrics"].items()):
        if isinstance(value, int | float):
            lines.append(f"  {name:<15} {value:.4f}")
    lines.append(f"  artifacts       {s.artifact_root}")
    lines.append(f"  log             {result['log']}")
    if result["mlflow_run_id"]:
        lines.append(f"  MLflow run      {result['mlflow_run_id']}  (make mlflow-ui, then http://127.0.0.1:5000)")
    if result["gate"]:
        lines.append(f"  gate            version {result['gate']['candidate']['version']} "
                     f"{result['gate']['decision']}: {result['gate']['reason']}")
    if result["served"]:
        from kiln.tasks.serving.auth import token_path

        token = "$KILN_SERVE_TOKEN" if s.serve_token else f"$(cat {token_path(s)})"
        lines.append(f"  served          {result['served']['url']} (version {result['served']['version']}); try:")
        lines.append(f"    curl -H \"Authorization: Bearer {token}\" -H 'Content-Type: application/json' "
                     f"-d '{_example_body(result['dag_id'])}' {result['served']['url']}/predict")
    sys.stdout.write("\n".join(lines) + "\n")


def _example_body(model: str) -> str:
    """A ``/predict`` body holding the first sample row of the served champion's bundle."""
    from kiln.tasks.bundle.load import load_bundle, records_from_frame
    from kiln.tasks.pipeline.endpoint import Endpoint
    from kiln.tasks.spec import spec_named

    deployment = Endpoint.of(spec_named(model)).current()
    if deployment is None:
        return '{"records": [{...}]}'
    raw, _ = load_bundle(deployment.champion.bundle).sample()
    return json.dumps({"records": records_from_frame(raw.head(1))})


def main(argv: list[str] | None = None) -> int:
    """The DAG runner behind ``kiln run`` (which execs it): run one pipeline, print the summary, exit 0 on success."""
    parser = argparse.ArgumentParser(prog="kiln run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dag_id", metavar="pipeline")
    parser.add_argument("--conf", default="{}", help="JSON object of Params, e.g. '{\"epochs\": 5}'")
    parser.add_argument("--log", type=Path, help="where Airflow's and the tasks' output goes "
                        "(default: $KILN_HOME/logs/<pipeline>.log); '-' keeps it on the terminal")
    args = parser.parse_args(argv)
    try:
        conf = json.loads(args.conf)
    except json.JSONDecodeError as exc:
        parser.error(f"--conf is not valid JSON: {exc}")
    if not isinstance(conf, dict):
        parser.error("--conf must be a JSON object, e.g. '{\"epochs\": 5}'")
    from kiln.tasks.settings import get_settings

    if str(args.log) == "-":
        result = run_dag(args.dag_id, conf)
        result["log"] = "(terminal)"
    else:
        log_path = (args.log or get_settings().home / "logs" / f"{args.dag_id}.log").resolve()
        sys.stdout.write(f"running {args.dag_id} through Airflow (conf {json.dumps(conf)}); log: {log_path}\n")
        with _output_to(log_path):
            result = run_dag(args.dag_id, conf)
        result["log"] = str(log_path)
    _print_summary(result)
    result.pop("tasks")
    result.pop("log")
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0 if result["state"] == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
