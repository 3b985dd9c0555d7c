"""A registered kiln model is a real MLflow Model: ``mlflow.pyfunc.load_model("models:/<name>@champion")`` in a
process without kiln predicts raw rows exactly as kiln's model server answers them.

A tiny model (the serving tests' bundle) is registered in a real MLflow (SQLite) and made champion. Then, at the same
time, a real model server serves the version's bundle as kiln's deploy step fetches it, and a fresh interpreter that
cannot import the installed kiln loads the champion through MLflow and predicts every raw test row (plus rows with a
missing number, a missing category and an unseen one). The two answers must agree within 1e-6 on every row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from serving_fixtures import bundle_factory, start_server_process  # noqa: F401

import kiln.tasks
from kiln.tasks.features.records import records_from_frame
from kiln.tasks.features.splits import TEST_RAW_FILE
from kiln.tasks.serving.deployment import Deployment, ModelRef, utc_now, write_deployment
from kiln.tasks.tracking.registry import RUN_KEY_TAG, Registry

pytestmark = pytest.mark.integration

PIPELINE = "penguins"
TOKEN = "pyfunc-test-token"
TOLERANCE = 1e-6

#: Runs in a fresh interpreter: hides the installed kiln, loads the champion through MLflow, predicts the rows.
LOAD_WITHOUT_KILN = r"""
import importlib.machinery, json, sys
installed, rows, out = sys.argv[1:4]

class HideInstalledKiln:
    # kiln may only come from the model's own copy of its loader (MLflow's code folder of the model).
    def find_spec(self, name, path=None, target=None):
        if name != "kiln" and not name.startswith("kiln."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        places = [spec.origin or "", *(spec.submodule_search_locations or [])] if spec else []
        if spec is None or any(p.startswith(installed) for p in places):
            raise ModuleNotFoundError(f"No module named {name!r} (the installed kiln is hidden)", name=name)
        return spec

sys.meta_path.insert(0, HideInstalledKiln())
try:
    import kiln.tasks
    raise SystemExit("the installed kiln is still importable")
except ModuleNotFoundError:
    pass
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model("models:/penguins@champion")
model.predict(pd.read_parquet(rows)).to_parquet(out)
print(json.dumps({"loader": sys.modules["kiln.tasks.bundle.load"].__file__}))
"""


@pytest.fixture(scope="module")
def registered(bundle_factory, tmp_path_factory) -> tuple[Registry, str, Path]:  # noqa: F811
    """A registry holding the tiny model as champion version; ``(registry, tracking uri, bundle folder)``."""
    root = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    registry = Registry(uri)
    experiment = registry.client.create_experiment(PIPELINE, (root / "artifacts").as_uri())
    run_id = registry.client.create_run(experiment).info.run_id
    bundle = bundle_factory(0)
    version = registry.register(PIPELINE, run_id, bundle, {RUN_KEY_TAG: f"{PIPELINE}/run1"})
    registry.set_champion(PIPELINE, version.version, action="gate", reason="the test's champion")
    return registry, uri, bundle


def raw_rows(bundle: Path) -> pd.DataFrame:
    """Every raw test row, then copies of the first three with a null number, a null and an unseen category."""
    test = pd.read_parquet(bundle.parent / "features" / TEST_RAW_FILE).drop(columns=["species"])
    edge = test.head(3).copy()
    edge["island"] = edge["island"].astype(object)
    edge.iloc[0, edge.columns.get_loc("bill_depth_mm")] = np.nan
    edge.iloc[1, edge.columns.get_loc("island")] = None
    edge.iloc[2, edge.columns.get_loc("island")] = "Atlantis"
    return pd.concat([test.astype({"island": object}), edge], ignore_index=True)


def test_pyfunc_without_kiln_predicts_every_test_row_as_the_model_server(registered, tmp_path):
    registry, uri, bundle = registered
    rows = raw_rows(bundle)
    rows.to_parquet(tmp_path / "rows.parquet")
    installed = str(Path(kiln.tasks.__file__).resolve().parent)
    loader = subprocess.Popen(
        [sys.executable, "-c", LOAD_WITHOUT_KILN, installed, str(tmp_path / "rows.parquet"),
         str(tmp_path / "pyfunc.parquet")], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": ""})
    champion = registry.champion(PIPELINE)
    assert champion is not None
    deployment = tmp_path / "deployment.json"
    fetched = registry.fetch_bundle(champion, tmp_path / "cache")  # what kiln's deploy step serves
    write_deployment(deployment, Deployment(PIPELINE, ModelRef(champion.version, str(fetched)), None, utc_now()))
    server = start_server_process(deployment, tmp_path / "server.log", env={"KILN_SERVE_TOKEN": TOKEN})
    try:
        response = httpx.post(f"{server.url}/predict", json={"records": records_from_frame(rows)},
                              headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    served = response.json()["predictions"]
    stdout, stderr = loader.communicate(timeout=300)
    assert loader.returncode == 0, stderr[-4000:]

    loaded_from = json.loads(stdout.strip().splitlines()[-1])["loader"]
    assert loaded_from.endswith("/code/kiln/tasks/bundle/load.py") and not loaded_from.startswith(installed)
    got = pd.read_parquet(tmp_path / "pyfunc.parquet")
    classes = list(served[0]["probabilities"])
    assert list(got.columns) == ["label", *(f"p_{c}" for c in classes)]
    assert len(got) == len(served) == len(rows)
    assert got["label"].tolist() == [p["label"] for p in served]
    want = np.array([[p["probabilities"][c] for c in classes] for p in served])
    difference = np.abs(got[[f"p_{c}" for c in classes]].to_numpy() - want).max()
    assert difference <= TOLERANCE, f"pyfunc and server differ by up to {difference:.3g}"
