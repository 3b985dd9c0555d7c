"""The layout's promises that an import graph alone cannot show: what a DAG file and a model server load."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("pandas", "numpy", "torch", "mlflow", "sklearn", "great_expectations", "pyarrow", "boto3", "docker")


def _loaded_after(statement: str) -> set[str]:
    """Top-level packages in ``sys.modules`` after ``statement`` runs in a fresh interpreter."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_the_step_list_loads_none_of_the_steps_libraries() -> None:
    """The DAG factory imports the one list of steps while parsing: the steps import their libraries when they run."""
    assert _loaded_after("import kiln.tasks.pipeline.steps") & set(HEAVY) == set()


def test_the_model_server_loads_no_spec_pool_step_or_launcher() -> None:
    """A model server needs the bundle, the feature transform and its own package: nothing of the pipeline."""
    code = ("import json, sys; import kiln.tasks.serving.app; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('kiln.'))))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    forbidden = ("kiln.tasks.spec", "kiln.tasks.pools", "kiln.tasks.steps", "kiln.tasks.launch",
                 "kiln.tasks.pipeline", "kiln.tasks.training", "kiln.tasks.tracking", "kiln.operators")
    assert [m for m in loaded if m.startswith(forbidden)] == []
    assert {"kiln.tasks.bundle.load", "kiln.tasks.features.transform", "kiln.tasks.features.records"} <= set(loaded)
