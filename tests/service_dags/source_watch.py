"""A watched pipeline's DAG for the source-watcher test: the pipeline's real schedule, one reading task.

The schedule is built by ``kiln_pipelines._schedule`` from the spec that ``KILN_WATCH_TEST_SPEC`` names: the
source's Asset with its ``SourceChangeTrigger`` watcher, exactly as a pipeline DAG gets it. Instead of the
pipeline's twelve steps, one task reads what the event names: each part of the triggering Asset events, from the
source with the ETag the event recorded (so an object replaced since fails the read), and writes what it read to
``$KILN_WATCH_TEST_OUT/<run id>.json``. Without ``KILN_WATCH_TEST_SPEC`` the file defines no DAG.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pendulum
from airflow.sdk import DAG, task

SPEC = os.environ.get("KILN_WATCH_TEST_SPEC")
REPO = Path(os.environ.get("KILN_WATCH_TEST_REPO", Path(__file__).resolve().parents[2]))


@task
def read_new_data(**context: object) -> list[str]:
    """Read every part the triggering events name, checked against the ETag each event recorded."""
    import json

    from kiln.tasks.sources.s3 import client
    from kiln.tasks.spec.sources import s3_parts

    events = context["triggering_asset_events"]
    extras = [dict(event.extra or {}) for asset_events in events.values() for event in asset_events]
    s3 = client()
    read = []
    for extra in extras:
        payload = extra["payload"]
        bucket, prefix = s3_parts(payload["root"])
        for part in payload["parts"]:
            body = s3.get_object(Bucket=bucket, Key=f"{prefix}{part['name']}", IfMatch=part["etag"])["Body"].read()
            read.append({"name": part["name"], "etag": part["etag"], "text": body.decode()})
    out = Path(os.environ["KILN_WATCH_TEST_OUT"]) / f"{context['run_id']}.json".replace(":", "_")
    out.write_text(json.dumps({"extras": extras, "read": read}))
    return [r["name"] for r in read]


if SPEC:
    sys.path.insert(0, str(REPO / "dags"))
    from kiln_pipelines import _schedule

    from kiln.tasks.spec import load_spec

    _spec = load_spec(SPEC)
    with DAG(
        dag_id=_spec.name,
        schedule=_schedule(_spec, Path(SPEC)),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        tags=["kiln", "test"],
        default_args={"owner": "ml-platform", "retries": 0},
        doc_md=__doc__,
    ) as source_watch:
        read_new_data()
