"""Services that look after themselves (issue 20, part 6), on the embedded profile started as ``make up`` starts it.

A deployed model server runs beside Airflow and MLflow. Killed with SIGKILL it is back within seconds, and ``kiln
status`` tells what it is doing; ``kiln up`` on a partly dead set restarts only the dead (the model server keeps its
pid and answers throughout); no component holds another's secrets (read from ``/proc/<pid>/environ``); the state
files are private; a server that cannot come back is reported dead after its restart budget, with no stale pid file.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kiln_service import EXAMPLE_SPECS, REPO, Platform, running_service
from serving_fixtures import bundle_factory  # noqa: F401

from kiln.tasks.processes import alive
from kiln.tasks.serving.deployment import Deployment, ModelRef, read_deployment, write_deployment

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

MODEL = "penguins_species"
#: The generous bound of "back within seconds": the server imports torch and loads its bundle again.
BACK_WITHIN_S = 30.0
#: Airflow's secrets that only Airflow's components may hold.
AIRFLOW_SECRET_VARS = ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY")


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory, bundle_factory) -> Iterator[Platform]:  # noqa: F811
    """The services of a home that already holds a deployment and, from an older install, world-readable state."""
    tmp = tmp_path_factory.mktemp("supervision")
    home = tmp / "home"
    write_deployment(home / "serving" / MODEL / "deployment.json",
                     Deployment(MODEL, ModelRef("1", str(bundle_factory(seed=0)))))
    (home / "logs" / "service").mkdir(parents=True)
    for old in (home / "pools.db", home / "logs" / "service" / "scheduler.log"):
        old.write_text("")
        old.chmod(0o644)
    for folder in (home, home / "logs", home / "logs" / "service"):
        folder.chmod(0o755)
    with running_service(tmp, specs=[EXAMPLE_SPECS / f"{MODEL}.yaml"]) as platform:
        yield platform


def _env(platform: Platform) -> dict[str, str]:
    return {**platform.service.env, "PYTHONPATH": str(REPO)}


def _kiln(platform: Platform, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.tasks.cli", *args], env=_env(platform), capture_output=True,
                          text=True, timeout=timeout)


def _status(platform: Platform) -> dict[str, Any]:
    result = _kiln(platform, "status", timeout=60)
    assert result.returncode in (0, 3), result.stderr
    return json.loads(result.stdout)


def _run_dir(platform: Platform) -> Path:
    return platform.home / "serving" / MODEL


def _server_pid(platform: Platform) -> int | None:
    try:
        return int((_run_dir(platform) / "server.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None


def _model_url(platform: Platform) -> str:
    return f"http://127.0.0.1:{platform.service.env['KILN_SERVE_PORT']}"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_for(what: str, check: Any, timeout: float, platform: Platform) -> float:
    """Poll ``check()`` until true; return the seconds it took (fail after ``timeout`` with the logs)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout:.0f} s\nstatus {_status(platform)}\n"
                        f"{platform.service.log_tails()}\n--- server.log ---\n"
                        f"{(_run_dir(platform) / 'server.log').read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    return time.monotonic() - started


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_files_are_private(platform: Platform) -> None:
    home = platform.home
    files = [home / "airflow" / "airflow.db", home / "mlflow.db", home / "pools.db",
             *(home / "secrets").iterdir(), *(home / "logs" / "service").glob("*.log")]
    assert {str(f.relative_to(home)): oct(_mode(f)) for f in files if _mode(f) != 0o600} == {}
    folders = [home, home / "airflow", home / "secrets", home / "logs", home / "logs" / "service", home / "serving"]
    assert {str(f): oct(_mode(f)) for f in folders if _mode(f) != 0o700} == {}
    # Task logs: Airflow chmods each new log file to its own setting, whatever the umask.
    for var, mode in (("AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FILE_PERMISSIONS", "0o600"),
                      ("AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FOLDER_PERMISSIONS", "0o700")):
        assert platform.service.env.get(var) == mode, var


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if item)


def test_components_hold_only_the_secrets_they_need(platform: Platform) -> None:
    keys = json.loads((platform.home / "secrets" / "airflow.json").read_text())
    secrets = {name: keys[name] for name in ("fernet_key", "jwt_secret", "api_secret")}
    pids = {**platform.service.state()["pids"], "model-server": _server_pid(platform)}
    assert pids["model-server"] and alive(pids["model-server"])
    leaks = {}
    for component, pid in pids.items():
        environ = _environ(pid)
        held = sorted({name for name, value in secrets.items() if value in environ.values()}
                      | {var for var in AIRFLOW_SECRET_VARS if var in environ})
        if held:
            leaks[component] = held
    # Airflow's components read their secrets from a private config file: what they fork (a task, and the model
    # server a deploy task starts) inherits no secret.
    assert leaks == {}
    assert not any(k.startswith("AIRFLOW") for k in _environ(pids["mlflow"])), "MLflow gets nothing of Airflow's"
    assert not any(k.startswith("AIRFLOW") for k in _environ(pids["model-server"]))
    config = Path(_environ(pids["scheduler"])["AIRFLOW_CONFIG"])
    assert _mode(config) == 0o600 and secrets["fernet_key"] in config.read_text()


def test_status_reports_each_model_server(platform: Platform) -> None:
    status = _status(platform)
    assert status["running"] is True
    server = status["model_servers"][MODEL]
    assert server["state"] == "running"
    assert server["pid"] == _server_pid(platform) and alive(server["pid"])
    assert server["port"] == int(platform.service.env["KILN_SERVE_PORT"])
    assert set(status["components"]) >= {"api-server", "scheduler", "mlflow", "model-servers"}
    assert {c["state"] for c in status["components"].values()} == {"running"}


def test_a_killed_model_server_is_back_within_seconds(platform: Platform) -> None:
    url = _model_url(platform)
    old = _server_pid(platform)
    assert old and _healthy(url)
    before = _status(platform)["model_servers"][MODEL]["restarts"]
    os.kill(old, signal.SIGKILL)
    back_s = _wait_for("the killed model server answers /health again",
                       lambda: _healthy(url) and _server_pid(platform) not in (None, old), BACK_WITHIN_S, platform)
    log.info("model server back %.1f s after SIGKILL", back_s)
    new = _server_pid(platform)
    assert new != old and alive(new) and not alive(old)
    server = _status(platform)["model_servers"][MODEL]
    assert (server["state"], server["pid"], server["restarts"]) == ("running", new, before + 1)
    assert f"restarted the model server of {MODEL!r}" in platform.service.log_file("model-servers").read_text()


class _Prober(threading.Thread):
    """Asks a server's ``/health`` every 50 ms until stopped; counts the answers that were not 200."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.ok, self.failed = url, 0, []
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as http:
            while not self._halt.is_set():
                try:
                    code = http.get(f"{self.url}/health").status_code
                except httpx.HTTPError as exc:
                    code = repr(exc)
                if code == 200:
                    self.ok += 1
                else:
                    self.failed.append(code)
                self._halt.wait(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def test_up_on_a_partly_dead_set_restarts_only_the_dead(platform: Platform) -> None:
    before = dict(platform.service.state()["pids"])
    server = _server_pid(platform)
    dead = ("mlflow", "triggerer")
    for name in dead:
        os.killpg(before[name], signal.SIGKILL)
    _wait_for("the killed components are gone", lambda: not any(alive(before[n]) for n in dead), 10, platform)
    assert _status(platform)["running"] is False
    prober = _Prober(_model_url(platform))
    prober.start()
    try:
        result = _kiln(platform, "up")
    finally:
        prober.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    after = platform.service.state()["pids"]
    assert {n: after[n] for n in before if n not in dead} == {n: before[n] for n in before if n not in dead}
    assert all(after[n] != before[n] and alive(after[n]) for n in dead)
    assert _server_pid(platform) == server and alive(server), "the healthy model server was restarted"
    assert prober.failed == [] and prober.ok > 0, f"{len(prober.failed)} failed health checks: {prober.failed[:5]}"
    assert httpx.get(f"{platform.service.mlflow_url}/health", timeout=5).status_code == 200
    assert _status(platform)["running"] is True


def test_a_server_that_cannot_come_back_is_reported_dead(platform: Platform) -> None:
    deployment_file = _run_dir(platform) / "deployment.json"
    good = read_deployment(deployment_file)
    write_deployment(deployment_file, Deployment(MODEL, ModelRef("1", str(platform.home / "no-such-bundle"))))
    try:
        os.kill(_server_pid(platform), signal.SIGKILL)
        _wait_for("the server is reported dead", lambda: _status(platform)["model_servers"][MODEL]["state"] == "dead",
                  240, platform)
        status = _status(platform)
        assert not (_run_dir(platform) / "server.pid").exists(), "a stale pid file claims a dead server runs"
        assert status["model_servers"][MODEL]["pid"] is None
        assert "no-such-bundle" in status["model_servers"][MODEL]["error"]
        assert _kiln(platform, "status", timeout=60).returncode == 3
    finally:
        write_deployment(deployment_file, good)
    result = _kiln(platform, "up")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _healthy(_model_url(platform)) and _status(platform)["model_servers"][MODEL]["state"] == "running"


def test_the_watchdog_dies_with_its_owner(tmp_path: Path) -> None:
    """The watchdog exits once the service record stops naming it (``kiln down`` removed it, another ``up``
    replaced it): it never outlives the set that started it."""
    owner, status_file = tmp_path / "service.json", tmp_path / "model-servers.json"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KILN_")}, "KILN_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "kiln.tasks.services.watchdog", "watch", "--owner", str(owner),
                             "--status", str(status_file)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        owner.write_text(json.dumps({"pids": {"model-servers": proc.pid}}))
        deadline = time.monotonic() + 60
        while not status_file.exists():  # it looked at the servers once: it runs, and was named
            assert proc.poll() is None and time.monotonic() < deadline, "the watchdog did not start"
            time.sleep(0.1)
        time.sleep(1)
        assert proc.poll() is None, "the watchdog exited while its owner names it"
        owner.unlink()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
