"""Smoke DAG for the Airflow service harness: a deferrable wait (exercises the triggerer), then one task.

The wait targets a moment relative to the sensor's own start, so it is deferred for ``WAIT_SECONDS`` however long
the run queued. ``TimeDeltaSensor(deferrable=True)`` is not used: in Airflow 3 it counts from the run's
``data_interval_end`` (for a manual run without a logical date, its ``run_after``: the trigger time) and, when
that moment has already passed as the task starts (a loaded machine), succeeds at once without deferring.
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync
from airflow.sdk import dag, task

#: Long enough that the workload which deferred has been reported finished before the trigger fires: on SQLite a
#: write can wait out the 5 s busy timeout, and a task resumed before that report arrives is marked failed by the
#: scheduler ("finished with state success, but the task instance's state attribute is queued").
WAIT_SECONDS = 12


@dag(
    dag_id="smoke_service",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["kiln", "test"],
    default_args={"owner": "ml-platform", "retries": 0},  # a failure must fail the run at once
    doc_md=__doc__,
)
def smoke_service():
    wait = DateTimeSensorAsync(
        task_id="wait", target_time=f"{{{{ (ti.start_date + macros.timedelta(seconds={WAIT_SECONDS})).isoformat() }}}}"
    )

    @task
    def report() -> str:
        """Log and return a marker the test looks for in the task log."""
        import logging
        import os

        logging.getLogger(__name__).info("smoke_service report from pid %d", os.getpid())
        return "smoke-ok"

    wait >> report()


smoke_service()
