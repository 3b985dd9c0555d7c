"""trigger_latency: scheduling overhead per task of a REST-triggered pipeline, and the idle memory of ``make up``.

The platform's services (``kiln.tasks.services.supervisor``, what ``make up`` runs; embedded profile: LocalExecutor,
SQLite)
start on free ports with a private ``KILN_HOME`` and only the tabular example pipeline (``penguins_species``) in
their pipelines folder. Once its DAG is parsed and SETTLE_S more seconds have let start-up transients die down,
the idle PSS of every live process of the service (each component's process group and its descendants) is summed
from ``/proc/<pid>/smaps_rollup``. Then RUNS runs are triggered through the REST API one after another, each timed
from the trigger call until the API reports ``success`` (polled every 0.5 s).

The peer is the same pipeline (same spec, same Params ``CONF``) run by ``kiln.tasks.pipeline.runner.run_all`` in one
Python
process under a private ``KILN_HOME``: one untimed warm-up run before the services start (MLflow store and
registry creation, the model server's first start, file cache), then IN_PROCESS_RUNS timed runs after they
stopped, so that the platform's idle background work does not slow the peer down.

    overhead per task = (median REST wall - median in-process wall) / tasks in the DAG (from the REST task list)

Targets: overhead <= 0.5 s per task, idle PSS <= 1.5 GB (10^9 bytes). The JSON line's ``value`` is the overhead
(s/task), its ``peer_value`` the in-process time per task, and its ``ratio`` is
``max(overhead / 0.5 s, idle PSS / 1.5 GB)`` against the target ``<= 1.0``, so it is met only when both are.
``details`` holds the per-run and per-component tables (``bench/results/trigger_latency.md``). Progress goes to
stderr; the JSON line is the last line on stdout.
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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from _common import isolated_environ, run_pipeline_in_process, stop_model_servers

REPO = Path(__file__).resolve().parents[1]
# tests/ is not a package: its service harness (kiln_service, airflow_service) is imported from the folder itself.
sys.path.insert(0, str(REPO / "tests"))

from airflow_client.client.api.dag_api import DAGApi  # noqa: E402
from airflow_client.client.api.dag_run_api import DagRunApi  # noqa: E402
from airflow_client.client.api.task_api import TaskApi  # noqa: E402
from airflow_client.client.api.task_instance_api import TaskInstanceApi  # noqa: E402
from airflow_client.client.exceptions import NotFoundException  # noqa: E402
from airflow_service import free_ports  # noqa: E402
from kiln_service import Platform, running_service  # noqa: E402

from kiln.tasks.processes import process_tree  # noqa: E402
from kiln.tasks.services.supervisor import Service  # noqa: E402

log = logging.getLogger("trigger_latency")

SPEC = REPO / "dags" / "pipelines" / "penguins_species.yaml"
DAG_ID = "penguins_species"
#: Trigger-time Params of every run, REST and in-process: a short training keeps a run at a few tens of seconds.
#: The cache off: each run measures every step, as the rows before the step cache did.
CONF: dict[str, int | bool] = {"epochs": 5, "nproc": 1, "use_cache": False}
RUNS, IN_PROCESS_RUNS = 3, 1
SETTLE_S = 10.0
DAG_PARSE_TIMEOUT_S = 180.0
TARGET_S_PER_TASK, TARGET_PSS_BYTES = 0.5, 1.5e9


@dataclass(frozen=True)
class RestRun:
    """One REST-triggered run: the client's wall time and what the API says about the run and its tasks."""

    run_id: str
    wall_s: float
    """From the trigger call to the poll that saw ``success``."""
    server_s: float
    """The run's ``queued_at`` to ``end_date``."""
    task_s: float
    """Sum of its task instances' durations (the tasks run one after another)."""
    states: dict[str, int]
    per_task: dict[str, tuple[float, float]]
    """task id -> (duration, wait before its start: since the previous task's end, the first's since queued_at)."""


def _seconds(start: datetime | None, end: datetime | None) -> float:
    if start is None or end is None:
        raise RuntimeError(f"run has no start/end date ({start}, {end})")
    return (end - start).total_seconds()


def wait_for_dag(platform: Platform, timeout: float = DAG_PARSE_TIMEOUT_S) -> int:
    """Wait until the dag-processor has parsed the pipeline's DAG; return its number of tasks (REST task list)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            DAGApi(platform.api).get_dag(DAG_ID)
            break
        except NotFoundException:
            if time.monotonic() > deadline:
                raise TimeoutError(f"DAG {DAG_ID} not parsed after {timeout:.0f} s\n"
                                   f"{platform.service.log_tails(['dag-processor'])}") from None
            time.sleep(0.5)
    return TaskApi(platform.api).get_tasks(DAG_ID).total_entries


def read_pss(pid: int) -> int:
    """The process's proportional set size in bytes (``Pss:`` of ``/proc/<pid>/smaps_rollup``)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss line in /proc/{pid}/smaps_rollup")


def idle_pss(service: Service) -> dict[str, tuple[int, int]]:
    """PSS per component: name -> (live processes, bytes), over each group leader's group and descendants."""
    state = service.state()
    if not state:
        raise RuntimeError(f"no state record under {service.paths.run_dir}: the services are not running")
    per_component = {}
    for name, leader in state["pids"].items():
        total, count = 0, 0
        for pid in sorted(process_tree({leader})):
            try:
                total += read_pss(pid)
                count += 1
            except (FileNotFoundError, ProcessLookupError):  # exited since it was listed: it holds no memory
                continue
        per_component[name] = (count, total)
    return per_component


def rest_run(platform: Platform, index: int) -> RestRun:
    """Trigger one run with ``CONF``, wait for it, and read its run and task-instance records back.

    Raises:
        RuntimeError: the run failed (the message names the failed tasks and carries the log tails).
    """
    t0 = time.perf_counter()
    run_id = platform.trigger(DAG_ID, CONF)
    state = platform.wait(DAG_ID, run_id)
    wall = time.perf_counter() - t0
    tis = TaskInstanceApi(platform.api).get_task_instances(DAG_ID, run_id).task_instances
    states: dict[str, int] = {}
    for ti in tis:
        key = ti.state.value if ti.state else "none"
        states[key] = states.get(key, 0) + 1
    if state != "success":
        failed = sorted(ti.task_id for ti in tis if ti.state and ti.state.value in ("failed", "upstream_failed"))
        raise RuntimeError(f"REST run {run_id} ended {state} (tasks {failed})\n{platform.service.log_tails()}")
    run = DagRunApi(platform.api).get_dag_run(DAG_ID, run_id)
    per_task, previous_end = {}, run.queued_at
    started = [(ti.start_date, ti) for ti in tis if ti.start_date is not None]  # a skipped task never started
    for start, ti in sorted(started, key=lambda pair: pair[0]):
        per_task[ti.task_id] = (ti.duration or 0.0, _seconds(previous_end, start))
        previous_end = ti.end_date
    result = RestRun(run_id, wall, _seconds(run.queued_at, run.end_date), sum(ti.duration or 0.0 for ti in tis),
                     states, per_task)
    log.info("REST run %d: %.1f s trigger -> success (server %.1f s, tasks %.1f s, %s)", index + 1, wall,
             result.server_s, result.task_s, states)
    return result


def in_process_run(env: dict[str, str], label: str) -> tuple[float, int]:
    """One ``run_all`` of the pipeline with ``CONF`` in a fresh process; returns its seconds and steps run."""
    result = run_pipeline_in_process(SPEC, CONF, f"bench_{label}_{time.time_ns()}", env)
    log.info("in-process run (%s): %.1f s, %d steps", label, result["duration_s"], len(result["steps"]))
    return result["duration_s"], len(result["steps"])


def details(runs: list[RestRun], plain: list[float], warmup: float, tasks: int,
            pss: dict[str, tuple[int, int]]) -> str:
    """The markdown tables of every run and of the idle memory per component."""
    lines = ["| run | side | wall s | server queued -> end s | sum of task durations s | "
             "outside tasks s/task |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | REST trigger -> success | {r.wall_s:.1f} | {r.server_s:.1f} | {r.task_s:.1f} | "
                     f"{(r.server_s - r.task_s) / tasks:.2f} |")
    lines.append(f"| warm-up | in process (not counted) | {warmup:.1f} | | | |")
    lines += [f"| {i} | in process | {s:.1f} | | | |" for i, s in enumerate(plain, 1)]
    lines += ["", f"{tasks} tasks; conf `{json.dumps(CONF)}`; states per REST run: "
              + "; ".join(json.dumps(r.states) for r in runs), "",
              "| task (REST, median over the runs) | duration s | wait before its start s |", "|---|---|---|"]
    for task in runs[0].per_task:
        cells = [r.per_task[task] for r in runs if task in r.per_task]
        lines.append(f"| {task} | {statistics.median(c[0] for c in cells):.1f} | "
                     f"{statistics.median(c[1] for c in cells):.2f} |")
    lines += ["",
              "| component (idle, after the DAG was parsed + "
              f"{SETTLE_S:g} s) | processes | PSS MB |", "|---|---|---|"]
    lines += [f"| {name} | {n} | {b / 1e6:.0f} |" for name, (n, b) in pss.items()]
    lines.append(f"| **total** | {sum(n for n, _ in pss.values())} | "
                 f"**{sum(b for _, b in pss.values()) / 1e6:.0f}** |")
    return "\n".join(lines)


def report(runs: list[RestRun], plain: list[float], warmup: float, tasks: int,
           pss: dict[str, tuple[int, int]]) -> dict:
    """The JSON result (see the module docstring for the ratio)."""
    rest_median, plain_median = statistics.median(r.wall_s for r in runs), statistics.median(plain)
    overhead = (rest_median - plain_median) / tasks
    # The part of the overhead spent between tasks (queueing, scheduling), the rest being inside the task processes.
    between = statistics.median(sum(w for _, w in r.per_task.values()) / len(r.per_task) for r in runs)
    pss_total = sum(b for _, b in pss.values())
    ratio = max(overhead / TARGET_S_PER_TASK, pss_total / TARGET_PSS_BYTES)
    walls = ", ".join(f"{r.wall_s:.1f}" for r in runs)
    peer = (f"same pipeline in one process, per task ({plain_median:.1f} s / {tasks} tasks; REST trigger -> success "
            f"{walls} s, median {rest_median:.1f} s, {between:.2f} s/task of it between tasks; idle PSS of `make up` "
            f"{pss_total / 1e9:.2f} GB, target <= {TARGET_PSS_BYTES / 1e9:g} GB; "
            f"ratio = max(overhead / {TARGET_S_PER_TASK:g} s, PSS / {TARGET_PSS_BYTES / 1e9:g} GB))")
    return {"name": "trigger_latency", "value": round(overhead, 3), "unit": "s/task", "peer": peer,
            "peer_value": round(plain_median / tasks, 3), "ratio": round(ratio, 3), "target": "<= 1.0",
            "rest_walls_s": [round(r.wall_s, 2) for r in runs], "in_process_s": [round(s, 2) for s in plain],
            "tasks": tasks, "between_tasks_s_per_task": round(between, 3),
            "idle_pss_mb": {n: round(b / 1e6) for n, (_, b) in pss.items()},
            "details": details(runs, plain, warmup, tasks, pss)}


def measure(tmp: Path, args: argparse.Namespace) -> dict:
    """Warm up the peer, start the services, measure idle PSS and the REST runs, stop them, time the peer."""
    plain_env = isolated_environ(tmp / "plain", KILN_SERVE_PORT=str(free_ports(1)[0]))
    try:
        warmup, steps = in_process_run(plain_env, "warm-up")
        log.info("starting the services under %s", tmp / "service")
        with running_service(tmp / "service", specs=[SPEC]) as platform:
            tasks = wait_for_dag(platform)
            if tasks != steps:
                raise RuntimeError(f"DAG {DAG_ID} has {tasks} tasks but run_all ran {steps} steps: not the same work")
            time.sleep(SETTLE_S)  # no condition marks the end of start-up's transients (first parses, JIT caches)
            pss = idle_pss(platform.service)
            log.info("idle PSS %.0f MB: %s", sum(b for _, b in pss.values()) / 1e6,
                     ", ".join(f"{n} {b / 1e6:.0f} MB" for n, (_, b) in pss.items()))
            runs = [rest_run(platform, i) for i in range(args.runs)]
        log.info("services stopped")
        plain = [in_process_run(plain_env, f"timed-{i + 1}")[0] for i in range(args.in_process_runs)]
    finally:
        stop_model_servers(plain_env)
    return report(runs, plain, warmup, tasks, pss)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=RUNS, help="REST-triggered runs (default %(default)s)")
    parser.add_argument("--in-process-runs", type=int, default=IN_PROCESS_RUNS,
                        help="timed in-process runs after the warm-up (default %(default)s)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.in_process_runs < 1:
        parser.error("--runs and --in-process-runs must be >= 1")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    try:
        result = measure(tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("benchmark took %.0f s", time.monotonic() - started)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
