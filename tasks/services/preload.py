"""Run an Airflow component with the pipeline steps' libraries imported first: ``python -m kiln.tasks.services.preload
scheduler`` is ``airflow scheduler`` whose task processes start warm.

Airflow starts every task in a process forked from the executor's worker (LocalExecutor workers are forked from
the scheduler; Celery's pool processes from the worker). A step then imports pandas, torch, MLflow, scikit-learn
or Great Expectations: seconds of CPU per task, on every task. Imported once here, before Airflow forks, they
are inherited by every task process, and their memory pages are shared copy-on-write.
"""

from __future__ import annotations

import importlib
import logging
import runpy
import sys
import time

log = logging.getLogger(__name__)

#: The third-party libraries most steps import, heaviest first. kiln's own modules are left out on purpose: they
#: import fast, and a task must run the code on disk now, not the code of when the services started.
#: Great Expectations (used by the validate step alone) is left out: it would add about 65 MB to idle memory.
PRELOAD = ("torch", "mlflow", "sklearn.metrics", "pandas", "pyarrow.parquet", "yaml")


def preload(modules: tuple[str, ...] = PRELOAD) -> float:
    """Import ``modules``; return the seconds it took."""
    started = time.monotonic()
    for name in modules:
        importlib.import_module(name)
    return time.monotonic() - started


def main() -> None:
    """Preload, then run the Airflow CLI with this process's arguments (``airflow <args>``).

    Airflow runs as the program it is (its ``__main__``, as ``python -m airflow`` would), so kiln's own code
    imports nothing of Airflow here.
    """
    seconds = preload()
    print(f"preloaded {len(PRELOAD)} modules for task processes in {seconds:.1f} s", file=sys.stderr, flush=True)
    sys.argv = ["airflow", *sys.argv[1:]]
    runpy.run_module("airflow", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
