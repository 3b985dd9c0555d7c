"""Resource pools through real Airflow: scheduler, LocalExecutor workers, triggerer and api-server.

DAG ``pool_gang`` (tests/service_dags) has 3 independent tasks that each lease 2 of the 4 GPUs of pool ``gpu``.
The inventory's GPU entries are a stand-in (no GPU exists here); everything else is real. With 4 worker slots
free, only the pool can hold the third task back: it must wait deferred in the triggerer (not occupying a
worker), then run once a lease is released, and at no instant may two leases hold the same GPU.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from airflow_service import AirflowService
from pool_audit import replay

pytestmark = pytest.mark.integration

SERVICE_DAGS = Path(__file__).resolve().parents[1] / "service_dags"
DAG_ID = "pool_gang"
INVENTORY = {
    "pools": {"gpu": {"nodes": [{
        "name": "gpubox", "address": "127.0.0.1", "cpus": 2, "memory": "16GiB",
        "gpus": [{"index": i, "memory": "80GiB", "model": "stand-in"} for i in range(4)],
    }]}},
}


def test_three_tasks_share_four_gpus_two_at_a_time(tmp_path: Path) -> None:
    from kiln.tasks.pools.inventory import load_inventory
    from kiln.tasks.pools.store import LeaseStore

    inventory_file = tmp_path / "pools.yaml"
    inventory_file.write_text(yaml.safe_dump(INVENTORY))
    pools_db = f"sqlite:///{tmp_path / 'pools.db'}"
    env = {"KILN_HOME": str(tmp_path / "kiln"), "KILN_POOLS_FILE": str(inventory_file),
           "KILN_POOLS_DB_URL": pools_db}
    seen: dict[str, set[str]] = defaultdict(set)

    def record(tis: list[dict]) -> None:
        for ti in tis:
            seen[ti["task_id"]].add(ti["state"])

    with AirflowService(SERVICE_DAGS, parallelism=4, extra_env=env, home=tmp_path / "airflow") as svc:
        svc.wait_for_dag(DAG_ID, timeout=90)
        run_id = svc.trigger(DAG_ID)
        state = svc.wait_for_run(DAG_ID, run_id, timeout=240, on_poll=record, interval=0.3)
        tis = {ti["task_id"]: ti for ti in svc.task_instances(DAG_ID, run_id)}
        logs = {t: svc.task_log(DAG_ID, run_id, t, ti["try_number"]) for t, ti in tis.items()}

    assert state == "success", {t: ti["state"] for t, ti in tis.items()}
    assert sorted(tis) == ["gpu_job_0", "gpu_job_1", "gpu_job_2"]
    deferred = [t for t, states in seen.items() if "deferred" in states]
    assert len(deferred) >= 1, f"no task waited deferred; states seen: {dict(seen)}"

    store = LeaseStore(pools_db, load_inventory(inventory_file))
    try:
        history = store.history("gpu")
        leases = store.leases("gpu")  # live ones only
        grants = [e for e in history if e.event == "grant"]
        released = [store.lease(e.lease_id) for e in grants]
    finally:
        store.close()
    assert len(grants) == 3
    peak, clashes = replay(history)
    assert peak == 2, f"expected 2 leases at once at most and at least once, saw {peak}"
    assert clashes == set(), f"GPUs {clashes} were held by two leases at once"
    assert leases == [], "a lease was left behind"
    # Each task released its own lease (none had to be reclaimed by expiry), and the lease names it as the owner.
    assert {lease.state for lease in released} == {"released"}
    assert {lease.owner.task_id for lease in released} == set(tis)
    for task_id, text in logs.items():
        match = re.search(r"leased GPUs (\S+)", text)
        assert match, f"{task_id} did not report its GPUs:\n{text[-2000:]}"
        assert len(match.group(1).split(",")) == 2
