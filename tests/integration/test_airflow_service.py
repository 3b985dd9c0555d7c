"""Real Airflow services (api-server, scheduler, dag-processor, triggerer as separate processes) run a DAG.

The smoke DAG's first task is a deferrable sensor: the run only succeeds if the scheduler, a LocalExecutor worker,
the triggerer and the execution API all work together, and the sensor must be seen ``deferred`` (waiting in the
triggerer, not holding a worker). After ``stop()`` no process of the harness may be left.

It runs on PostgreSQL (the production metadata DB). The same harness on SQLite, with a task seen deferred in the
triggerer, is what tests/integration/test_pool_airflow.py and test_source_watcher.py run on; a third SQLite start
here would cost ~40 s and prove nothing they do not.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

import pytest
from airflow_service import AirflowService, temporary_postgres_database

from kiln.tasks.processes import alive, process_tree

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

SERVICE_DAGS = Path(__file__).resolve().parents[1] / "service_dags"
DAG_ID = "smoke_service"


def _run_smoke_dag(home: Path, db_url: str | None) -> None:
    started = time.monotonic()
    svc = AirflowService(SERVICE_DAGS, db_url=db_url, home=home)
    with svc:
        dag = svc.wait_for_dag(DAG_ID, timeout=90)
        assert not dag["is_paused"], "DAGs must start unpaused in the harness"
        seen: dict[str, set[str | None]] = defaultdict(set)

        def record(tis: list[dict]) -> None:
            for ti in tis:
                seen[ti["task_id"]].add(ti["state"])

        run_started = time.monotonic()
        run_id = svc.trigger(DAG_ID, conf={"origin": "test_airflow_service"})
        state = svc.wait_for_run(DAG_ID, run_id, timeout=120, on_poll=record)
        run_seconds = time.monotonic() - run_started

        tis = {ti["task_id"]: ti for ti in svc.task_instances(DAG_ID, run_id)}
        if state != "success":  # say why in the failure itself: the harness's folder is gone afterwards
            logs = "\n".join(f"--- {k} ({v['state']}):\n{svc.task_log(DAG_ID, run_id, k, v['try_number'])[-3000:]}"
                             for k, v in tis.items() if v["state"] == "failed")
            # A task that fails before it logs (not started, lost by the executor) shows up only in these.
            for name in ("scheduler", "triggerer"):
                path = svc.log_file(name)
                text = path.read_text(errors="replace") if path.exists() else ""
                notable = [line for line in text.splitlines() if "wait" in line or "rror" in line or "ail" in line]
                logs += f"\n--- {name}.log (lines naming the task, errors, failures):\n" + "\n".join(notable[-40:])
            pytest.fail(f"run {run_id} ended {state}: { {k: v['state'] for k, v in tis.items()} }\n{logs}")
        assert {ti["state"] for ti in tis.values()} == {"success"}
        assert "deferred" in seen["wait"], f"the sensor never showed as deferred; states seen {dict(seen)}"
        assert "smoke-ok" in svc.task_log(DAG_ID, run_id, "report", tis["report"]["try_number"])

        groups = set(svc.component_pids.values())
        pids = svc.process_ids()
        assert groups <= set(pids), "the components should be among the harness processes"
    log.info("%s: ready after %.1f s (%s), run %.1f s, total with stop %.1f s", svc.db_url.split(":")[0],
             svc.startup_seconds, svc.timings, run_seconds, time.monotonic() - started)
    assert [pid for pid in pids if alive(pid)] == [], "processes of the harness survived stop()"
    assert process_tree(groups) == set(), "a component's process group survived stop()"
    assert svc.process_ids() == []


@pytest.mark.postgres
def test_smoke_dag_runs_on_postgres(tmp_path: Path) -> None:
    with temporary_postgres_database() as db_url:
        _run_smoke_dag(tmp_path / "airflow", db_url=db_url)
