"""A training job never outlives the task that launched it, and a job that somehow did cannot write into its
retry's state.

The task process is played by a child Python process that runs the local launcher, as the ``train`` operator does;
its stdin and stdout are a socket, as an Airflow task's are (the task supervisor's). SIGKILL of that process (what
the OOM killer sends) must take torchrun and every rank with it, and none of them may hold the socket.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from synthetic import write_features

from kiln.tasks.launch.base import LOG_FILE, TrainingFailedError
from kiln.tasks.launch.torchrun import LocalTorchrunLauncher
from kiln.tasks.processes import stop_groups
from kiln.tasks.spec import ModelSpec, TrainingSpec
from kiln.tasks.training import fence
from kiln.tasks.training.checkpoints import list_checkpoints
from kiln.tasks.training.job import TrainConfig

pytestmark = pytest.mark.integration

#: What the "task" runs: the local launcher on a config file, as TrainOperator does in its task process.
TASK = """
import sys
from pathlib import Path
from kiln.tasks.launch.torchrun import LocalTorchrunLauncher
from kiln.tasks.training.job import TrainConfig
config = TrainConfig.from_json(Path(sys.argv[1]).read_text())
LocalTorchrunLauncher().launch(config, nproc=2, workdir=Path(sys.argv[2]))
"""


def make_config(root: Path, features: Path, token: str | None, epochs: int = 40) -> TrainConfig:
    return TrainConfig(
        features_dir=str(features), output_dir=str(root / "out"), checkpoint_dir=str(root / "ckpt"),
        task="classification", model=ModelSpec(hidden_sizes=[32]),
        training=TrainingSpec(epochs=epochs, batch_size=16, learning_rate=1e-3, seed=3, log_every_steps=10_000,
                              timeout_s=300),
        fence_token=token)


def wait_for(condition, what: str, timeout_s: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def job_processes(marker: str) -> list[psutil.Process]:
    """Live processes whose command line names ``marker`` (the job's config file), torchrun and ranks alike."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(marker in arg for arg in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def socket_inode(sock: socket.socket) -> str:
    return f"socket:[{os.fstat(sock.fileno()).st_ino}]"


def test_sigkill_of_the_task_takes_the_whole_job_with_it_and_no_job_process_holds_the_task_socket(tmp_path):
    features = write_features(tmp_path / "features", n=3000, d=8, n_classes=3, seed=1)
    config = make_config(tmp_path, features, token="try-1")
    fence.claim(Path(config.checkpoint_dir), "try-1")
    config_file = tmp_path / "try1.json"
    config_file.write_text(config.to_json())
    workdir = tmp_path / "try1"
    workdir.mkdir()
    # The task's stdin/stdout/stderr are one end of a socket pair, as under Airflow's task supervisor.
    supervisor_end, task_end = socket.socketpair()
    task = subprocess.Popen([sys.executable, "-c", TASK, str(config_file), str(workdir)],
                            stdin=task_end, stdout=task_end, stderr=task_end)
    task_end.close()
    try:
        first = Path(config.checkpoint_dir) / "epoch_0001.pt"
        wait_for(first.exists, "the job's first checkpoint", timeout_s=240)
        job = job_processes(str(workdir / "train_config.json"))
        assert len(job) >= 3, f"expected torchrun and 2 ranks, found {[p.cmdline() for p in job]}"
        held = {p.pid: [os.readlink(f"/proc/{p.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{p.pid}/fd")]
                for p in job}
        sock = socket_inode(supervisor_end)
        # The peer end's inode differs; any socket the task had as 0/1/2 would show up as one of these two.
        task_socket = os.readlink(f"/proc/{task.pid}/fd/0")
        assert all(task_socket not in fds and sock not in fds for fds in held.values()), held

        task.send_signal(signal.SIGKILL)
        task.wait(10)
        gone_s = wait_for(lambda: not job_processes(str(workdir / "train_config.json")),
                          "every process of the job to die with its task", timeout_s=10)
        print(f"job gone {gone_s:.2f} s after SIGKILL of its task ({len(job)} processes)")
    finally:
        task.kill()
        task.wait(10)
        supervisor_end.close()
        leftovers = job_processes(str(workdir / "train_config.json"))
        if leftovers:
            stop_groups({p.pid for p in leftovers}, grace_s=0)


def test_a_job_of_an_earlier_try_stops_writing_once_the_retry_claims_the_checkpoints(tmp_path):
    """Even a job that survived its task (here: one still running in this process) cannot write into the
    retry's checkpoints: the retry's claim makes its next checkpoint fail the job, and all later checkpoints are
    the retry's own."""
    features = write_features(tmp_path / "features", n=3000, d=8, n_classes=3, seed=1)
    orphan_config = make_config(tmp_path, features, token="try-1", epochs=30)
    ckpt = Path(orphan_config.checkpoint_dir)
    fence.claim(ckpt, "try-1")
    orphan = LocalTorchrunLauncher()
    errors: list[BaseException] = []

    def run_orphan() -> None:
        try:
            orphan.launch(orphan_config, nproc=2, workdir=tmp_path / "try1")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run_orphan)
    thread.start()
    try:
        wait_for((ckpt / "epoch_0002.pt").exists, "the orphan's second checkpoint", timeout_s=240)
        fence.claim(ckpt, "try-2")  # what the retry does before it starts its job
        at_claim = {p.name for _, p in list_checkpoints(ckpt)}
        thread.join(timeout=120)
    finally:
        orphan.terminate()
        thread.join(timeout=30)
    assert errors and isinstance(errors[0], TrainingFailedError), errors
    assert "a newer try of the task took over" in (tmp_path / "try1" / LOG_FILE).read_text()
    after = {p.name for _, p in list_checkpoints(ckpt)}
    assert after <= at_claim, f"the orphan wrote {sorted(after - at_claim)} after the retry claimed the folder"
    resumed = max(int(name[6:10]) for name in at_claim)

    retry = make_config(tmp_path, features, token="try-2", epochs=resumed + 3)
    retry = TrainConfig.from_json(retry.to_json().replace(str(tmp_path / "out"), str(tmp_path / "out2")))
    LocalTorchrunLauncher().launch(retry, nproc=2, workdir=tmp_path / "try2")
    assert f"resuming from checkpoint epoch {resumed}" in (tmp_path / "try2" / LOG_FILE).read_text()
    written = [torch.load(p, weights_only=True)["fence_token"] for _, p in list_checkpoints(ckpt)]
    assert written == ["try-2", "try-2"], written
