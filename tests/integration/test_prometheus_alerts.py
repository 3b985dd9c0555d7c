"""kiln's alert rules and dashboard against a real Prometheus (Debian's ``prometheus`` and ``promtool``, installed by
``make prometheus``) scraping a real model server (``python -m kiln.tasks.serving`` on loopback).

The rules load and pass their promtool unit tests (one per alert, ``docker/monitoring/kiln-alerts.test.yml``). Then
Prometheus scrapes the server every second and evaluates the rules every second: a ``latest.json`` with a breach,
published into the server's artifact store as the monitor publishes it, fires the drift alerts (only for the
drifted features), and a captured request too big for the capture buffer fires the capture alert. Every series
the rules and the dashboard name is one the server exports, and every dashboard query parses in Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import REPO, free_port
from prometheus_client.parser import text_string_to_metric_families
from serving_fixtures import ServerProcess, bundle_factory, records, start_server_process  # noqa: F401

from kiln.tasks.processes import ProcessGroup, start_process
from kiln.tasks.serving.deployment import CaptureSettings, Deployment, ModelRef, utc_now, write_deployment
from kiln.tasks.serving.monitor_gauges import LATEST_FILE, latest_key
from kiln.tasks.storage.artifacts import LocalArtifactStore

MONITORING = REPO / "docker" / "monitoring"
RULES = MONITORING / "kiln-alerts.yml"
RULE_TESTS = MONITORING / "kiln-alerts.test.yml"
DASHBOARD = MONITORING / "kiln-dashboard.json"
NEEDS_PROMETHEUS = pytest.mark.skipif(
    not (shutil.which("prometheus") and shutil.which("promtool")),
    reason="prometheus/promtool are not installed (run `make prometheus`)")
pytestmark = pytest.mark.integration

TOKEN = "prometheus-test-kiln-token"
PIPELINE = "penguins"
#: How long an alert may take to fire: a scrape and an evaluation, each every second, plus slack for a busy host.
FIRE_WAIT_S = 20.0
#: Values of the dashboard's variables when its queries are checked.
DASHBOARD_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*", "$pipeline": ".*"}
_METRIC_NAME = re.compile(r"\bkiln_[a-z0-9_]+")


def eventually(probe: Callable[[], Any], what: str, prometheus: str | None = None, timeout: float = FIRE_WAIT_S
               ) -> Any:
    """``probe()``'s first truthy answer, asked every 0.1 s; after ``timeout`` the test fails with what Prometheus
    (at URL ``prometheus``) knows then: its alerts and the health of its targets."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answer := probe():
            return answer
        time.sleep(0.1)
    state = ""
    if prometheus is not None:
        targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        state = (f"; targets {[(t['scrapeUrl'], t['health'], t['lastError']) for t in targets]}; alerts "
                 f"{[(a['labels'], a['state']) for a in alerts]}")
    pytest.fail(f"no {what} within {timeout} s{state}")


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


#: The PSI of each feature in the published monitor run; those at 0.2 or above drifted.
PSI = {"body_mass_g": 0.8, "island": 0.5, "bill_depth_mm": 0.02}


def latest_with_breach() -> dict[str, Any]:
    """A ``latest.json`` (the monitor's format 1) of a run that found the features of :data:`PSI` at 0.2 or above
    drifted, and the live accuracy 16 points below the test figure; its canary (version 2) is 20 points below the
    champion's live accuracy."""
    now = utc_now()
    drifted = {name: psi >= 0.2 for name, psi in PSI.items()}
    return {"format": 1, "pipeline": PIPELINE, "window": {"start": now, "end": now}, "finished_at": now,
            "versions": ["1"], "rows": 500, "no_traffic": False,
            "features": {name: {"psi": psi, "p_value": 1e-9 if drifted[name] else 0.4, "drift": drifted[name]}
                         for name, psi in PSI.items()},
            "predictions": {"psi": 0.3, "drift": True},
            "quality": {"metric": "accuracy", "live": 0.81, "baseline": 0.97, "breach": True},
            "breach": True, "action": "alert", "retrain_requested": False,
            "canary": {"version": "2", "rows": 120, "drifted": [],
                       "quality": {"metric": "accuracy", "live": 0.61, "baseline": 0.96, "breach": True},
                       "versus_champion": {"metric": "accuracy", "champion": 0.81, "canary": 0.61, "breach": True},
                       "breach": True}}


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def server(prometheus_process, bundle_factory, store_root, tmp_path_factory  # noqa: F811
           ) -> Iterator[ServerProcess]:
    """A model server capturing every request into a buffer of 2 records (a 3-record request is dropped); started
    after ``prometheus_process`` so that Prometheus's start-up and its target tick overlap the server's."""
    folder = tmp_path_factory.mktemp("prometheus-server")
    deployment = folder / "deployment.json"
    write_deployment(deployment, Deployment(PIPELINE, ModelRef("1", str(bundle_factory(0))), None, utc_now(),
                                            CaptureSettings(1.0)))
    server = start_server_process(deployment, folder / "server.log", "--capture-max-rows", "2",
                                  env={"KILN_SERVE_TOKEN": TOKEN, "KILN_ARTIFACT_ROOT": str(store_root)})
    try:
        yield server
    finally:
        server.stop()


def prometheus_config(targets: list[str]) -> dict[str, Any]:
    """Scrape ``targets`` and evaluate kiln's rules, both every second."""
    return {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "kiln-serve", "static_configs": [{"targets": targets}]}]}


@pytest.fixture(scope="module")
def prometheus_process(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A Prometheus on loopback, started while the model server starts: Prometheus hands new targets to its
    scrapers on a 5 s tick, which then overlaps the server's start-up. Its URL and config file."""
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config([])))
    port = free_port()
    proc: ProcessGroup = start_process(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
        output=folder / "prometheus.log", die_with_parent=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited:\n{(folder / 'prometheus.log').read_text()[-3000:]}")
        with suppress(httpx.HTTPError):
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
        return False

    try:
        eventually(ready, "answer of prometheus's /-/ready", timeout=30)
        yield url, config
    finally:
        proc.stop(grace_s=5, what="prometheus")


@pytest.fixture(scope="module")
def prometheus(prometheus_process, server) -> str:
    """The URL of a Prometheus that scrapes ``server`` (once its first scrape is in)."""
    url, config = prometheus_process
    config.write_text(yaml.safe_dump(prometheus_config([f"127.0.0.1:{server.port}"])))
    reloaded = httpx.post(f"{url}/-/reload", timeout=30)
    assert reloaded.status_code == 200, reloaded.text
    eventually(lambda: query(url, 'up{job="kiln-serve"} == 1'), "first scrape of the server", url)
    return url


def query(url: str, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", f"{expr}: {answer}"
    return answer["data"]["result"]


def firing(url: str, name: str) -> list[dict[str, str]]:
    alerts = httpx.get(f"{url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return [a["labels"] for a in alerts if a["labels"]["alertname"] == name and a["state"] == "firing"]


def publish_latest(store_root: Path, doc: dict[str, Any]) -> None:
    """Publish ``latest.json`` as the monitor does: a new version of its key in the server's store, atomically."""
    with LocalArtifactStore(store_root).writer(latest_key(PIPELINE)) as folder:
        (folder / LATEST_FILE).write_text(json.dumps(doc))


def server_series(server: ServerProcess) -> set[str]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


@NEEDS_PROMETHEUS
def test_the_rules_load_and_every_alert_passes_its_promtool_unit_test():
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    unit = subprocess.run(["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                          timeout=60, cwd=MONITORING)

    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in check.stdout
    assert unit.returncode == 0, unit.stdout + unit.stderr
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"] if case.get("exp_alerts")}
    assert tested == {rule["alert"] for rule in alert_rules()}, "an alert without a test that sees it fire"


def test_the_dashboard_is_a_grafana_dashboard_whose_panels_all_query_prometheus():
    dashboard = json.loads(DASHBOARD.read_text())

    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in dashboard["panels"]:
        assert panel["title"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


@NEEDS_PROMETHEUS
def test_a_published_breach_fires_the_drift_alerts_of_the_drifted_features(server, prometheus, store_root):
    assert not query(prometheus, "kiln_monitor_breach"), "monitor figures before any monitor run"

    publish_latest(store_root, latest_with_breach())

    breach = eventually(lambda: firing(prometheus, "KilnMonitorBreach"), "firing KilnMonitorBreach", prometheus)
    assert breach == [{"alertname": "KilnMonitorBreach", "pipeline": PIPELINE, "severity": "warning"}]
    drifted = eventually(lambda: (a := firing(prometheus, "KilnFeatureDrift")) and len(a) >= 2 and a,
                         "KilnFeatureDrift firing for both drifted features", prometheus)
    assert sorted(a["feature"] for a in drifted) == sorted(name for name, psi in PSI.items() if psi >= 0.2)
    canary = eventually(lambda: firing(prometheus, "KilnCanaryMonitorBreach"), "firing KilnCanaryMonitorBreach",
                        prometheus)
    assert canary == [{"alertname": "KilnCanaryMonitorBreach", "pipeline": PIPELINE, "version": "2",
                       "severity": "warning"}]
    assert not firing(prometheus, "KilnMonitorStale")


@NEEDS_PROMETHEUS
def test_captured_rows_dropped_by_a_full_buffer_fire_the_capture_alert(server, prometheus):
    eventually(lambda: query(prometheus, 'kiln_capture_dropped_total{reason="full"} == 0'),
               "scrape of the dropped counter before the drop", prometheus)
    assert not firing(prometheus, "KilnCaptureDropping")

    response = httpx.post(f"{server.url}/predict", json={"records": records(3)},
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)

    assert response.status_code == 200, response.text  # dropping a capture never fails the request
    dropping = eventually(lambda: firing(prometheus, "KilnCaptureDropping"), "firing KilnCaptureDropping", prometheus)
    assert [(a["reason"], a["instance"]) for a in dropping] == [("full", f"127.0.0.1:{server.port}")]


@NEEDS_PROMETHEUS
def test_every_series_in_the_rules_and_the_dashboard_is_exported_and_every_query_parses(server, prometheus,
                                                                                       store_root):
    publish_latest(store_root, latest_with_breach())  # the monitor's gauges exist only once it has run
    exported = eventually(lambda: (names := server_series(server)) and "kiln_monitor_breach" in names and names,
                          "kiln_monitor_breach in the server's /metrics")

    used = {name for expr in [r["expr"] for r in alert_rules()] + dashboard_exprs()
            for name in _METRIC_NAME.findall(expr)}
    assert used - exported == set(), "series the server does not export"
    for expr in dashboard_exprs():
        for variable, value in DASHBOARD_VARIABLES.items():
            expr = expr.replace(variable, value)
        query(prometheus, expr)  # a query that does not parse answers "bad_data"
