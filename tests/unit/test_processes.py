"""kiln.tasks.processes with real processes: whole groups stop, stragglers are killed, output streams in order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from kiln.tasks.processes import (
    OutputLog,
    ProcessGroup,
    alive,
    process_tree,
    start_process,
    stop_groups,
    tail,
    usable_cpus,
)

#: A child (same group) that ignores SIGTERM, under a shell that dies of it; the child says when its trap is set.
STUBBORN_CHILD = ["sh", "-c", '(trap "" TERM; echo ready; sleep 60) & wait']
#: A grandchild that leaves the group for a session of its own and prints its pid.
ESCAPED_GRANDCHILD = ["sh", "-c", '"$0" -c "$1" & wait', sys.executable,
                      "import os, time; os.setsid(); print(os.getpid(), flush=True); time.sleep(60)"]


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def started() -> Iterator[list[ProcessGroup]]:
    """Processes a test started; whatever it left running is killed afterwards."""
    procs: list[ProcessGroup] = []
    yield procs
    for proc in procs:
        proc.stop(grace_s=0)


def start(started: list[ProcessGroup], argv: list[str], output: OutputLog | Path, **kwargs: Any) -> ProcessGroup:
    started.append(start_process(argv, output=output, **kwargs))
    return started[-1]


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(started: list[ProcessGroup]) -> None:
    output = OutputLog()
    proc = start(started, STUBBORN_CHILD, output)
    wait_for(lambda: "ready" in output.tail, "the child to ignore SIGTERM")
    members = process_tree({proc.pid})
    assert proc.pid in members and len(members) >= 2
    assert os.getsid(proc.pid) == proc.pid != os.getsid(0), "the command must lead a session of its own"

    began = time.monotonic()
    killed = proc.stop(grace_s=0.3)

    assert time.monotonic() - began >= 0.3
    assert killed and proc.pid not in killed, "the shell dies of SIGTERM; only its child needed SIGKILL"
    assert set(killed) <= members
    assert proc.poll() == -signal.SIGTERM
    assert not any(alive(pid) for pid in members)
    assert process_tree({proc.pid}) == set()


def test_a_grandchild_that_started_its_own_session_is_stopped_too(started: list[ProcessGroup]) -> None:
    output = OutputLog()
    proc = start(started, ESCAPED_GRANDCHILD, output)
    wait_for(lambda: output.tail, "the grandchild's pid")
    grandchild = int(output.tail[0])
    assert os.getpgid(grandchild) == grandchild != proc.pid, "the grandchild left the command's group"
    assert grandchild in process_tree({proc.pid})

    assert proc.stop(grace_s=2.0) == [], "SIGTERM reached the grandchild: nothing had to be killed"

    assert not alive(grandchild)


def test_lines_stream_in_order_to_the_file_the_callback_and_a_bounded_tail(tmp_path: Path,
                                                                          started: list[ProcessGroup]) -> None:
    seen: list[str] = []
    script = 'i=1; while [ $i -le 50 ]; do echo "line $i"; i=$((i+1)); done; echo oops >&2'
    with OutputLog(tmp_path / "out.log", tail_lines=5, on_line=seen.append) as output:
        proc = start(started, ["sh", "-c", script], output)
        assert proc.wait(timeout=10) == 0
        assert proc.join_output(timeout=10)
    expected = [f"line {i}" for i in range(1, 51)] + ["oops"]
    assert seen == expected
    assert list(output.tail) == expected[-5:]
    assert (tmp_path / "out.log").read_text().splitlines() == expected
    output.write("after close")  # a straggler's line: tail and callback only
    assert seen[-1] == "after close" and "after close" not in (tmp_path / "out.log").read_text()


def test_output_to_a_file_is_appended(tmp_path: Path, started: list[ProcessGroup]) -> None:
    log_file = tmp_path / "server.log"
    log_file.write_text("earlier\n")
    offset = log_file.stat().st_size
    proc = start(started, ["sh", "-c", "echo one; echo two >&2; cat"], log_file)  # stdin is /dev/null: cat ends
    assert proc.wait(timeout=10) == 0
    assert proc.join_output(timeout=0)
    assert log_file.read_text() == "earlier\none\ntwo\n"
    assert tail(log_file, 1) == "two"
    assert tail(log_file, 30, offset=offset) == "one\ntwo"
    assert tail(tmp_path / "missing.log") == ""


def test_stop_is_idempotent_and_safe_once_the_process_exited(started: list[ProcessGroup]) -> None:
    done = start(started, ["true"], OutputLog())
    assert done.wait(timeout=10) == 0
    assert done.stop(grace_s=5) == [] and done.stop(grace_s=5) == []

    running = start(started, ["sleep", "60"], OutputLog())
    stoppers = [threading.Thread(target=running.stop, args=(5.0,)) for _ in range(2)]  # two at once
    for thread in stoppers:
        thread.start()
    assert running.wait(timeout=10) == -signal.SIGTERM
    for thread in stoppers:
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert running.stop(grace_s=5) == []
    assert stop_groups({running.pid}, grace_s=0) == []


def test_stop_from_a_signal_handler_ends_a_wait_in_the_same_thread(started: list[ProcessGroup]) -> None:
    output = OutputLog()
    proc = start(started, STUBBORN_CHILD, output)
    wait_for(lambda: "ready" in output.tail, "the child to ignore SIGTERM")
    previous = signal.signal(signal.SIGUSR1, lambda *_: proc.stop(grace_s=0.2))
    try:
        threading.Timer(0.05, os.kill, args=(os.getpid(), signal.SIGUSR1)).start()
        assert proc.wait(timeout=10) == -signal.SIGTERM  # the handler ran inside this wait
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert process_tree({proc.pid}) == set()


def test_a_zombie_is_not_alive(tmp_path: Path, started: list[ProcessGroup]) -> None:
    proc = start(started, ["sh", "-c", "exit 3"], tmp_path / "out.log")
    wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE, "the child to exit")
    assert not alive(proc.pid)
    assert alive(os.getpid())
    assert proc.poll() == 3  # reaped now
    assert not alive(proc.pid)


def test_the_command_runs_on_the_given_cpu_cores(started: list[ProcessGroup]) -> None:
    core = min(os.sched_getaffinity(0))
    output = OutputLog()
    proc = start(started, ["grep", "Cpus_allowed_list", "/proc/self/status"], output, cpus={core})
    assert proc.wait(timeout=10) == 0 and proc.join_output(timeout=10)
    assert output.tail[0].split() == ["Cpus_allowed_list:", str(core)]
    assert usable_cpus((core, 10_000)) == {core}, "a core this machine lacks is left out"


#: A parent that starts ``sleep 60`` (dying with it, or not, as argv[1] says), prints its pid, then waits.
PARENT_OF_SLEEP = ["-c", """
import sys, time
from pathlib import Path
from kiln.tasks.processes import start_process
proc = start_process(["sleep", "60"], output=Path(sys.argv[2]), die_with_parent=sys.argv[1] == "die")
print(proc.pid, flush=True)
time.sleep(60)
"""]


@pytest.mark.parametrize("dies", [True, False], ids=["die_with_parent", "outlives_parent"])
def test_a_child_started_to_die_with_its_parent_dies_when_the_parent_is_sigkilled(tmp_path: Path, dies: bool) -> None:
    """The OOM killer's SIGKILL gives the parent no chance to stop its children: the kernel must (and does not,
    unless asked: the second case shows what the first one guards against)."""
    parent = subprocess.Popen([sys.executable, *PARENT_OF_SLEEP, "die" if dies else "stay", str(tmp_path / "log")],
                              stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        if dies:
            wait_for(lambda: not alive(child), "the child to die with its parent", timeout_s=5)
        else:
            time.sleep(0.5)
            assert alive(child)
    finally:
        parent.kill()
        parent.wait(10)
        if child:
            stop_groups({child}, grace_s=0)
