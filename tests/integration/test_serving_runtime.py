"""The model server's runtime choice (``--runtime`` / ``KILN_SERVE_RUNTIME``): which runtime serves, and the refusals
that name the setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serving_fixtures import (  # noqa: F401
    assert_same_predictions,
    bundle_factory,
    expected_predictions,
    make_bundle_without_onnx,
    make_torchscript_bundle,
    records,
    start_server_process,
)

from kiln.tasks.bundle.load import load_bundle
from kiln.tasks.serving.deployment import Deployment, ModelRef, utc_now, write_deployment

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TOKEN = "runtime-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def deployment_of(bundle: Path, folder: Path) -> Path:
    return write_deployment(folder / "deployment.json", Deployment("penguins", ModelRef("1", str(bundle)), None,
                                                                   utc_now()))


def test_the_setting_chooses_the_runtime_and_ready_names_it(bundle_factory, tmp_path):  # noqa: F811
    bundle = bundle_factory(0)
    server = start_server_process(deployment_of(bundle, tmp_path), tmp_path / "server.log",
                                  env={"KILN_SERVE_TOKEN": TOKEN, "KILN_SERVE_RUNTIME": "torch"})
    try:
        rows = records(8)
        ready = httpx.get(f"{server.url}/ready", timeout=10).json()
        answer = httpx.post(f"{server.url}/predict", json={"records": rows}, timeout=30,
                            headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        assert server.stop() in (0, -15)

    assert ready["champion"] == {"version": "1", "runtime": "torch"}
    assert answer.status_code == 200, answer.text
    torch_bundle, onnx_bundle = load_bundle(bundle, "torch"), load_bundle(bundle, "onnx")
    got = [p["probabilities"][c] for p in answer.json()["predictions"] for c in torch_bundle.classes]
    for served, runtime in ((torch_bundle, "torch"), (onnx_bundle, "onnx")):
        assert got == pytest.approx(served.predict_records(rows).ravel().tolist(), abs=1e-6), runtime
    assert "runtime torch" in server.log_text()


def test_a_rollback_to_a_format_1_bundle_serves_it_with_torchscript(bundle_factory, tmp_path):  # noqa: F811
    v1 = bundle_factory(0)
    old = make_torchscript_bundle(v1, tmp_path / "format1")  # a version registered before bundle format 2
    deployment = deployment_of(v1, tmp_path)
    server = start_server_process(deployment, tmp_path / "server.log", env={"KILN_SERVE_TOKEN": TOKEN})
    try:
        write_deployment(deployment, Deployment("penguins", ModelRef("0", str(old)), None, utc_now()))
        reload = httpx.post(f"{server.url}/admin/reload", headers=AUTH, timeout=30)
        rows = records(4)

        response = httpx.post(f"{server.url}/predict", json={"records": rows}, headers=AUTH, timeout=30)
    finally:
        assert server.stop() in (0, -15)

    assert reload.status_code == 200, f"{reload.status_code} {reload.text}\n{server.log_text()[-3000:]}"
    body = reload.json()
    assert body["champion"] == {"version": "0", "runtime": "torchscript"}
    assert response.status_code == 200 and response.json()["version"] == "0"
    assert_same_predictions(response.json()["predictions"], expected_predictions(v1, rows))


def run_server(deployment: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m kiln.tasks.serving`` that is expected to exit during start-up (a port is never opened)."""
    full_env = {**os.environ, "KILN_SERVE_TOKEN": TOKEN, **(env or {}),
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "kiln.tasks.serving", "--deployment", str(deployment), "--port",
                           "1", *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=120)


def test_runtime_onnx_for_a_bundle_without_onnx_exits_naming_the_setting(bundle_factory, tmp_path):  # noqa: F811
    bundle = make_bundle_without_onnx(bundle_factory(0), tmp_path / "bundle", reason="the ONNX conversion failed: X")

    done = run_server(deployment_of(bundle, tmp_path), "--runtime", "onnx")

    assert done.returncode == 2, done.stderr
    assert f"champion version 1: cannot serve the bundle {bundle}" in done.stderr
    assert "has no model.onnx (the ONNX conversion failed: X), so it cannot be served with runtime 'onnx'; choose " \
           "'auto' or 'torch' (the model server's --runtime flag or KILN_SERVE_RUNTIME)" in done.stderr


@pytest.mark.parametrize(("args", "env", "message"), [
    ((), {"KILN_SERVE_RUNTIME": "tensorrt"},
     "environment variable KILN_SERVE_RUNTIME must be one of auto, onnx, torch, found 'tensorrt'"),
    (("--runtime", "tensorrt"), {},
     "argument --runtime: invalid choice: 'tensorrt' (choose from 'auto', 'onnx', 'torch')"),
], ids=["setting", "flag"])
def test_an_unknown_runtime_is_refused_naming_the_setting(tmp_path, args, env, message):
    done = run_server(tmp_path / "deployment.json", *args, env=env)

    assert done.returncode == 2 and message in done.stderr, done.stderr
