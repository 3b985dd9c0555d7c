"""Watched pipelines' DAGs for the source-watcher test: each pipeline's real schedule, one reading task.

For each spec file that ``KILN_WATCH_TEST_SPECS`` names (``os.pathsep``-separated), the schedule is built by
``kiln_pipelines._schedule``: the source's Asset with its ``SourceChangeTrigger`` watcher, exactly as a pipeline
DAG gets it. Instead of the pipeline's twelve steps, one task reads what the events name: each part of the
triggering Asset events, from S3 with the ETag the event recorded (so an object replaced since fails the read), or
a SQL source's new watermark; it writes what it read to ``$KILN_WATCH_TEST_OUT/<run id>.json``. Without
``KILN_WATCH_TEST_SPECS`` the file defines no DAG.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pendulum
from airflow.sdk import DAG, task

SPECS = [p for p in os.environ.get("KILN_WATCH_TEST_SPECS", "").split(os.pathsep) if p]
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
        if "watermark" in payload:
            read.append({"watermark": payload["watermark"]})
            continue
        bucket, prefix = s3_parts(payload["root"])
        for part in payload["parts"]:
            body = s3.get_object(Bucket=bucket, Key=f"{prefix}{part['name']}", IfMatch=part["etag"])["Body"].read()
            read.append({"name": part["name"], "etag": part["etag"], "text": body.decode()})
    out = Path(os.environ["KILN_WATCH_TEST_OUT"]) / f"{context['run_id']}.json".replace(":", "_")
    out.write_text(json.dumps({"extras": extras, "read": read}))
    return [str(r.get("name", r.get("watermark"))) for r in read]


for _path in SPECS:
    if str(REPO / "dags") not in sys.path:
        sys.path.insert(0, str(REPO / "dags"))
    from kiln_pipelines import _schedule

    from kiln.tasks.spec import load_spec

    _spec = load_spec(_path)
    with DAG(
        dag_id=_spec.name,
        schedule=_schedule(_spec, Path(_path)),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        tags=["kiln", "test"],
        default_args={"owner": "ml-platform", "retries": 0},
        doc_md=__doc__,
    ) as _dag:
        read_new_data()
    globals()[_spec.name] = _dag
