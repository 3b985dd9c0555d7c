"""Serving control against real model-server processes on loopback: start/reload/stop, port conflicts, infra
validation of real bundles, and canaries that are promoted or roll back on their own."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import serving_fixtures
import torch
from conftest import free_port
from serving_fixtures import make_bundle, records

from kiln.tasks.bundle.load import MANIFEST_FILE, SAMPLE_PREDICTIONS_FILE
from kiln.tasks.evaluation.canary import watch_canary
from kiln.tasks.serving.client import ServingClient, ServingError
from kiln.tasks.serving.deployment import (
    Deployment,
    ModelRef,
    drop_canary,
    promote_canary,
    read_deployment,
    with_canary,
    with_champion,
    write_deployment,
)
from kiln.tasks.serving.models import WARM_UP_TOLERANCE
from kiln.tasks.serving.process import PortInUseError, ServerStartError, ensure_server, stop_server
from kiln.tasks.spec import CanarySpec, InfraValidationSpec
from kiln.tasks.steps.infra_validate import InfraValidateConfig, InfraValidationError, run_infra_validate
from kiln.tasks.storage.artifacts import read_json, write_json

pytestmark = pytest.mark.integration

TOKEN = "test-token-not-a-secret"
HOST = "127.0.0.1"
MODEL = "penguins_species"

#: The session's cache of tiny trained bundles (a fixture), shared with the other serving tests.
bundle_factory = serving_fixtures.bundle_factory


@pytest.fixture()
def server_dir(tmp_path: Path) -> Iterator[Path]:
    """The run folder of the test's server; whatever a test leaves running there is stopped afterwards."""
    run_dir = tmp_path / "run"
    yield run_dir
    stop_server(run_dir)


def _deploy(path: Path, champion: Path, version: str = "1") -> Path:
    return write_deployment(path, Deployment(MODEL, ModelRef(version, str(champion))))


def _rewrite_checksum(bundle: Path, name: str) -> None:
    """Record the current sha256 of ``name`` in the manifest, as an exporter that wrote it would have."""
    manifest = read_json(bundle / MANIFEST_FILE)
    manifest["files"][name] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    write_json(bundle / MANIFEST_FILE, manifest)


def _server_processes_with(marker: str) -> list[int]:
    """Pids of live model-server processes whose command line contains ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"kiln.tasks.serving" in cmdline and marker.encode() in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


def test_ensure_server_starts_a_detached_server_then_reloads_it(tmp_path: Path, server_dir: Path,
                                                                bundle_factory: Callable[..., Path]) -> None:
    deployment = _deploy(tmp_path / "deployment.json", bundle_factory(0))
    port = free_port()

    first = ensure_server(deployment, host=HOST, port=port, token=TOKEN, run_dir=server_dir)

    assert first.url == f"http://{HOST}:{port}" and first.log_file == server_dir / "server.log"
    assert (server_dir / "server.pid").read_text().strip() == str(first.pid)
    assert os.getsid(first.pid) == first.pid != os.getsid(0), "the server must run in its own session"
    assert TOKEN.encode() not in Path(f"/proc/{first.pid}/cmdline").read_bytes()
    with ServingClient(first.url, TOKEN) as client:
        assert client.predict(records(2))["version"] == "1"
        with pytest.raises(ServingError, match="answered 422") as invalid:
            client.predict([{"island": "Dream"}])
        assert invalid.value.status == 422 and "records[0]" in str(invalid.value.detail)
        with ServingClient(first.url, "not-the-token") as stranger, pytest.raises(ServingError) as refused:
            stranger.predict(records(1))
        assert refused.value.status == 401 and "not-the-token" not in str(refused.value)
        with pytest.raises(ServingError, match="refused this kiln's token") as foreign:
            ensure_server(deployment, host=HOST, port=port, token="not-the-token", run_dir=server_dir)
        # The message says which process holds the port and how to get past it.
        assert f"(pid {first.pid}, deployment {deployment.resolve()})" in str(foreign.value)
        assert "make serve-stop" in str(foreign.value) and "KILN_SERVE_PORT" in str(foreign.value)

        write_deployment(deployment, with_champion(read_deployment(deployment), ModelRef("2", str(bundle_factory(1)))))
        second = ensure_server(deployment, host=HOST, port=port, token=TOKEN, run_dir=server_dir)

        assert second.pid == first.pid, "a running server of the model is reloaded, not replaced"
        assert client.wait_ready(5, version="2")["champion"] == {"version": "2", "runtime": "onnx"}
        assert client.predict(records(2))["version"] == "2"
        assert _server_processes_with(str(deployment)) == [first.pid]

        assert stop_server(server_dir)
        assert not client.health()
    with pytest.raises(ProcessLookupError):
        os.kill(first.pid, 0)
    assert not (server_dir / "server.pid").exists()
    assert not stop_server(server_dir), "nothing left to stop"


class _NotKiln(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.send_error(404)

    def log_message(self, *args: Any) -> None:
        pass


def test_port_held_by_a_foreign_listener_is_refused_naming_the_port(tmp_path: Path, server_dir: Path,
                                                                     bundle_factory: Callable[..., Path]) -> None:
    deployment = _deploy(tmp_path / "deployment.json", bundle_factory(0))
    foreign = http.server.HTTPServer((HOST, 0), _NotKiln)
    port = foreign.server_address[1]
    thread = threading.Thread(target=foreign.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(PortInUseError, match=rf"port {port}\b.*KILN_SERVE_PORT"):
            ensure_server(deployment, host=HOST, port=port, token=TOKEN, run_dir=server_dir)
    finally:
        foreign.shutdown()
        foreign.server_close()
    assert not (server_dir / "server.pid").exists()


def test_a_taken_port_names_the_spec_field_that_chose_it(tmp_path: Path, bundle_factory: Callable[..., Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline whose spec sets deployment.port is told to change that field, not KILN_SERVE_PORT."""
    from kiln.tasks.pipeline.endpoint import Endpoint
    from kiln.tasks.serving.deployment import read_deployment
    from kiln.tasks.spec import parse_spec

    monkeypatch.setenv("KILN_SERVING_DIR", str(tmp_path / "serving"))
    foreign = http.server.HTTPServer((HOST, 0), _NotKiln)
    port = foreign.server_address[1]
    spec = parse_spec({"name": "churn", "source": {"uri": "/data.csv"}, "target": "y", "task": "classification",
                       "deployment": {"port": port}}, "churn.yaml")
    deployment = read_deployment(_deploy(tmp_path / "deployment.json", bundle_factory(0)))
    thread = threading.Thread(target=foreign.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(PortInUseError, match=rf"port {port}\b.*deployment.port of the churn spec"):
            Endpoint.of(spec).serve(deployment)
    finally:
        foreign.shutdown()
        foreign.server_close()


def test_a_server_that_cannot_load_its_bundle_fails_to_start_with_its_log(tmp_path: Path, server_dir: Path) -> None:
    missing = tmp_path / "no-such-bundle"
    deployment = _deploy(tmp_path / "deployment.json", missing)

    with pytest.raises(ServerStartError, match="exited with code 2") as info:
        ensure_server(deployment, host=HOST, port=free_port(), token=TOKEN, run_dir=server_dir, start_timeout_s=60)

    assert str(missing) in info.value.log_tail
    assert not (server_dir / "server.pid").exists()


@pytest.mark.parametrize(("budget_ms", "passes"), [(10_000.0, True), (1e-6, False)],
                         ids=["within_budget", "over_budget"])
def test_infra_validation_serves_the_bundle_with_training_parity(bundle_factory: Callable[..., Path],
                                                                 budget_ms: float, passes: bool) -> None:
    config = InfraValidateConfig(bundle_dir=bundle_factory(0),
                                 rules=InfraValidationSpec(latency_budget_ms=budget_ms, requests=80))
    if passes:
        result = run_infra_validate(config)
    else:
        with pytest.raises(InfraValidationError, match="latency") as info:
            run_infra_validate(config)
        result = info.value.result

    assert result.passed is passes
    assert result.max_diff is not None and result.max_diff <= config.rules.tolerance
    assert result.requests == max(80, result.rows) and result.rows > 0
    assert result.p50_ms is not None and result.p99_ms is not None and result.p50_ms <= result.p99_ms
    assert ("parity" in result.reason) is passes, "only a passing report mentions parity; a failure names latency"
    assert _server_processes_with("kiln-infra-validate-") == [], "the throwaway server must be stopped"


def _tampered(bundle: Path, dest: Path, change: Callable[[np.ndarray], None]) -> Path:
    """A copy of ``bundle`` whose recorded training-side predictions were changed (checksum updated to match)."""
    copy = shutil.copytree(bundle, dest)
    predictions = np.load(copy / SAMPLE_PREDICTIONS_FILE)
    change(predictions)
    np.save(copy / SAMPLE_PREDICTIONS_FILE, predictions)
    _rewrite_checksum(copy, SAMPLE_PREDICTIONS_FILE)
    return copy


def test_infra_validation_fails_when_served_predictions_drift_from_training(
        tmp_path: Path, bundle_factory: Callable[..., Path]) -> None:
    # Within what the server's own warm-up check lets through, but 5x the step's tolerance.
    drift = 5e-5
    assert 1e-5 < drift < WARM_UP_TOLERANCE

    def nudge(predictions: np.ndarray) -> None:
        predictions[3, 0] += drift

    bundle = _tampered(bundle_factory(0), tmp_path / "bundle", nudge)

    with pytest.raises(InfraValidationError, match="parity") as info:
        run_infra_validate(InfraValidateConfig(
            bundle_dir=bundle, rules=InfraValidationSpec(tolerance=1e-5, latency_budget_ms=10_000)))

    result = info.value.result
    assert not result.passed and result.max_diff == pytest.approx(drift, rel=0.2)
    assert "parity: served predictions differ" in result.reason and "tolerance 1e-05" in result.reason
    assert _server_processes_with("kiln-infra-validate-") == []


def test_infra_validation_fails_when_the_runtime_refuses_the_bundle(tmp_path: Path,
                                                                   bundle_factory: Callable[..., Path]) -> None:
    def swap_classes(predictions: np.ndarray) -> None:
        # One row's probabilities attributed to the wrong classes: the server's warm-up refuses to load it.
        predictions[3] = np.roll(predictions[3], 1)

    bundle = _tampered(bundle_factory(0), tmp_path / "bundle", swap_classes)

    with pytest.raises(InfraValidationError, match="parity check") as info:
        run_infra_validate(InfraValidateConfig(bundle_dir=bundle, rules=InfraValidationSpec(latency_budget_ms=10_000)))

    assert "sample predictions" in info.value.result.reason and not info.value.result.passed
    assert _server_processes_with("kiln-infra-validate-") == []


def _exploding_bundle(root: Path) -> Path:
    """A bundle that loads and warms up, then fails inside the model on records with an island it never saw.

    One hidden unit of a trained network is rewired to fire only on the ``island`` unknown bucket (zero for every
    known island, so the sample rows and their training-side predictions are unaffected), with weights that make
    all logits infinite: such a request yields NaN probabilities, which the server counts as a model failure.
    """
    from kiln.tasks.bundle.export import ExportConfig, export_bundle
    from kiln.tasks.bundle.program import PROGRAM_FILE, export_program, save_program
    from kiln.tasks.features.transform import FEATURE_SPEC_FILE, UNKNOWN, FeatureTransform
    from kiln.tasks.spec import ModelSpec
    from kiln.tasks.training.networks import MODEL_FILE, load_model, save_model

    bundle = make_bundle(root, seed=2)
    features, train = root / "features", root / "train"  # the layout make_bundle trains in
    model = load_model(train)
    unknown = FeatureTransform.load(features / FEATURE_SPEC_FILE).feature_names.index(f"island={UNKNOWN}")
    first, last = model.module.net[0], model.module.net[-1]
    with torch.no_grad():
        first.weight[0].zero_()
        first.bias[0] = 0.0
        first.weight[0, unknown] = 1e30
        last.weight[:, 0] = 1e30
    meta = dict(model.meta)
    save_model(train / MODEL_FILE, model.module, model_spec=ModelSpec.model_validate(meta.pop("model_spec")),
               input_dim=meta.pop("input_dim"), n_outputs=meta.pop("n_outputs"), task=meta.pop("task"), extra=meta)
    # The exported program, as the train step writes it (zeros: no unknown island, so the export check is finite).
    example = torch.zeros(4, model.meta["input_dim"])
    save_program(export_program(model.module, example, "classification"), train / PROGRAM_FILE, model.meta)
    shutil.rmtree(bundle)
    return Path(export_bundle(ExportConfig(features_dir=features, model_dir=train), bundle).bundle_dir)


@contextmanager
def _traffic(url: str, batch: list[dict[str, Any]]) -> Iterator[list[str]]:
    """Send ``batch`` to ``/predict`` in a loop from a thread until the block ends; yields the failed requests."""
    failures: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        with ServingClient(url, TOKEN) as client:
            while not stop.is_set():
                try:
                    client.predict(batch)
                except ServingError as exc:
                    failures.append(str(exc))

    thread = threading.Thread(target=loop, name="canary-traffic", daemon=True)
    thread.start()
    try:
        yield failures
    finally:
        stop.set()
        thread.join(timeout=30)


def _serve_with_canary(tmp_path: Path, server_dir: Path, champion: Path, canary: Path, share: float) -> tuple[
        Path, str]:
    deployment = _deploy(tmp_path / "deployment.json", champion)
    write_deployment(deployment, with_canary(read_deployment(deployment), ModelRef("2", str(canary)), share))
    handle = ensure_server(deployment, host=HOST, port=free_port(), token=TOKEN, run_dir=server_dir)
    return deployment, handle.url


def test_a_broken_canary_rolls_back_on_its_own(tmp_path: Path, server_dir: Path,
                                               bundle_factory: Callable[..., Path]) -> None:
    policy = CanarySpec(share=0.5, min_requests=20, window_s=120)
    deployment, url = _serve_with_canary(tmp_path, server_dir, bundle_factory(0),
                                         _exploding_bundle(tmp_path / "broken"), policy.share)
    unseen_island = [{**row, "island": "Atlantis"} for row in records(1)]

    with ServingClient(url, TOKEN) as client:
        with _traffic(url, unseen_island) as failures:
            verdict = watch_canary(client, policy, poll_s=0.1)

        assert not verdict.promote
        assert "error rate" in verdict.reason and verdict.stats["canary"]["errors"] >= 1
        assert failures == [], "a failing canary must never fail a user request: the champion answers it"

        write_deployment(deployment, drop_canary(read_deployment(deployment)))
        assert client.reload()["canary"] is None
        answers = [client.predict(unseen_island) for _ in range(20)]
    assert {(a["variant"], a["version"]) for a in answers} == {("champion", "1")}


def test_a_healthy_canary_is_promoted(tmp_path: Path, server_dir: Path, bundle_factory: Callable[..., Path]) -> None:
    # p99s on a shared test machine are noisy; this test is about the promotion path, not latency.
    policy = CanarySpec(share=0.5, min_requests=20, window_s=120)
    deployment, url = _serve_with_canary(tmp_path, server_dir, bundle_factory(0), bundle_factory(1), policy.share)

    with ServingClient(url, TOKEN) as client:
        with _traffic(url, records(3)) as failures:
            verdict = watch_canary(client, policy, poll_s=0.1, latency_floor_ms=1_000)

        assert verdict.promote, verdict.reason
        assert verdict.stats["canary"]["requests"] >= policy.min_requests and verdict.stats["canary"]["errors"] == 0
        assert failures == []

        write_deployment(deployment, promote_canary(read_deployment(deployment)))
        ready = client.reload()
        assert ready["champion"]["version"] == "2" and ready["canary"] is None
        assert client.predict(records(2))["version"] == "2"
