"""``python -m kiln.tasks.services.mlflow_server ARGS`` is ``mlflow server ARGS`` in one process instead of two.

``mlflow server`` prepares its settings, then starts uvicorn as a child process and waits for it: the waiting
parent keeps MLflow imported (about 200 MB) for nothing. Here the same preparation runs, and its final spawn
becomes an ``exec``: uvicorn replaces this process (same pid, same environment additions), so the service
supervisor tracks and stops the server itself.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def _exec_instead(cmd: list[str], *, extra_env: dict[str, str] | None = None, **_ignored: Any) -> None:
    os.execvpe(cmd[0], cmd, {**os.environ, **(extra_env or {})})


def main() -> None:
    """Run MLflow's ``server`` command with its uvicorn spawn replaced by an exec."""
    import mlflow.server
    from mlflow.cli import cli

    # mlflow.server calls this module-level name once, as the last step of `_run_server`; if a future MLflow
    # renames it, the server still starts, as two processes.
    if hasattr(mlflow.server, "_exec_cmd"):
        mlflow.server._exec_cmd = _exec_instead  # type: ignore[attr-defined]
    cli(args=["server", *sys.argv[1:]], prog_name="mlflow")


if __name__ == "__main__":
    main()
