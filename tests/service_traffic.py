"""Traffic for a served model in the service tests: penguin rows sent to ``/predict`` (and labels to ``/feedback``),
what the server captured, and its ``/metrics``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pandas as pd
from kiln_service import Platform


def penguin_rows() -> pd.DataFrame:
    """The source's own rows: traffic in distribution."""
    import palmerpenguins

    return pd.read_csv(Path(palmerpenguins.__file__).parent / "data" / "penguins.csv")


def send(platform: Platform, rows: pd.DataFrame, labels: bool) -> int:
    """POST ``rows`` (less the target) to the served endpoint, 50 records a request, and, with ``labels``, their
    species to ``/feedback`` by each answer's request id; wait until the server has written them all to the store
    (it flushes every 10 s). Returns the records sent."""
    from kiln.tasks.serving.auth import resolve_token
    from kiln.tasks.settings import get_settings

    settings = get_settings(platform.service.env)
    auth = {"Authorization": f"Bearer {resolve_token(settings)}"}
    records = json.loads(rows.drop(columns=["species"]).to_json(orient="records"))
    with httpx.Client(base_url=f"http://127.0.0.1:{settings.serve_port}", headers=auth, timeout=30) as server:
        before = served_counts(server)
        for start in range(0, len(records), 50):
            answer = server.post("/predict", json={"records": records[start:start + 50]})
            assert answer.status_code == 200, answer.text
            if labels:
                sent = server.post("/feedback", json={"request_id": answer.headers["x-request-id"],
                                                      "labels": list(rows["species"].iloc[start:start + 50])})
                assert sent.status_code == 200, sent.text
        deadline = time.monotonic() + 60
        while (now := served_counts(server))["flushed"] < before["flushed"] + (2 if labels else 1) or \
                now["captured"] < before["captured"] + len(records) or now["buffered"] > 0:
            assert time.monotonic() < deadline, f"the server did not flush its captures within 60 s: {now}"
            time.sleep(0.5)
    return len(records)


def captured_rows(platform: Platform, pipeline_dir: Path) -> int:
    """Rows in the pipeline's published capture files, once the server holds none unwritten."""
    import pyarrow.parquet as pq

    from kiln.tasks.settings import get_settings

    port = get_settings(platform.service.env).serve_port
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as server:
        deadline = time.monotonic() + 60
        while served_counts(server)["buffered"] > 0:
            assert time.monotonic() < deadline, "the server did not write its captures within 60 s"
            time.sleep(0.5)
    files = (pipeline_dir / "_capture").glob("version=*/hour=*/*/capture.parquet")
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files if not f.parent.name.startswith("."))


def samples(server: httpx.Client) -> dict[tuple[str, str | None], float]:
    """The server's ``/metrics``, keyed by sample name and its ``status`` or ``feature`` label."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, s.labels.get("status") or s.labels.get("feature")): s.value
            for family in text_string_to_metric_families(server.get("/metrics").text) for s in family.samples}


def served_counts(server: httpx.Client) -> dict[str, float]:
    """Records captured, flushes that wrote them, and records still buffered in the server."""
    found = samples(server)
    return {"captured": found.get(("kiln_capture_records_total", None), 0.0),
            "flushed": found.get(("kiln_capture_flushes_total", "ok"), 0.0),
            "buffered": found.get(("kiln_capture_buffered_records", None), 0.0)}
