"""Three tasks that each lease 2 of the 4 GPUs of pool ``gpu`` (an inventory stand-in: no GPU exists here).

At most two can hold a lease at once; the third must wait deferred in the triggerer, then run. Each task prints
the GPUs it was given and sleeps long enough for the overlap to be observable.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from kiln.operators.command import PooledCommandOperator

_WORK = "import os, time; print('leased GPUs', os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(8)"

with DAG(
    dag_id="pool_gang",
    doc_md=__doc__,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["kiln", "test"],
    default_args={"owner": "ml-platform", "retries": 0},
    max_active_tasks=8,
) as dag:
    for i in range(3):
        PooledCommandOperator(task_id=f"gpu_job_{i}", command=[sys.executable, "-c", _WORK], resource_pool="gpu",
                              gpus=2, cpus=0, ttl_s=20, wait_timeout_s=300,
                              execution_timeout=timedelta(minutes=10))
