"""Shared pieces of the bundle unit tests (``tests/unit/test_bundle*.py``): run folders as ``build_features`` and
``train`` leave them, module-scoped exports per task, and copies of a bundle to alter.

Import the fixtures into a test module by assignment (``exports = bundle_fixtures.exports``), as the serving tests do
with ``bundle_factory``; each module then exports its own bundles once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic import write_run_dirs

from kiln.tasks.bundle.export import ExportConfig, export_bundle
from kiln.tasks.bundle.load import MANIFEST_FILE
from kiln.tasks.spec import ModelSpec

PROVENANCE = {"pipeline": "penguins", "run_key": "penguins/r1", "code_version": "abc123"}


def make_run_dirs(tmp_path: Path, task: str, model_spec: ModelSpec | None = None, n: int = 60,
                  pixels: bool = False) -> tuple[Path, Path]:
    """A ``build_features`` folder and an untrained network saved as the ``train`` step would."""
    rng = np.random.default_rng(0)
    if pixels:
        df = pd.DataFrame({f"p{i}": rng.random(n) for i in range(16)})
        types = {c: "numeric" for c in df.columns}
    else:
        df = pd.DataFrame({"a": np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n)), "b": rng.normal(size=n),
                           "kind": pd.array(rng.choice(["p", "q", None], n), dtype="string"),
                           "year": rng.choice([2007, 2008, 2009], n)})
        types = {"a": "numeric", "b": "numeric", "kind": "categorical", "year": "categorical"}
    if task == "classification":
        df["y"] = pd.array(["cat", "dog", "eel"] * (n // 3), dtype="string")
    else:
        df["y"] = 2 * df["b"] + rng.normal(scale=0.1, size=n)
    types["y"] = "categorical" if task == "classification" else "numeric"
    return write_run_dirs(tmp_path, df, types, task, model_spec)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """Per task, ``(features, model, bundle)`` folders, exported once for the module."""
    folders = {}
    for task in ("classification", "regression"):
        tmp = tmp_path_factory.mktemp(task)
        features, model = make_run_dirs(tmp, task)
        export_bundle(ExportConfig(features, model, metadata=PROVENANCE), tmp / "bundle")
        folders[task] = (features, model, tmp / "bundle")
    return folders


@pytest.fixture(params=["classification", "regression"])
def exported(request, exports) -> tuple[Path, Path, Path]:
    """The exported folders of each task in turn."""
    return exports[request.param]


def copy_bundle(path: Path, tmp_path: Path) -> Path:
    """A copy of bundle ``path`` in ``tmp_path / "copy"``, for a test to alter."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in path.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    return copy


def rehash(path: Path) -> None:
    """Refresh the manifest's hashes, as if the altered files had been exported so."""
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["files"] = {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in manifest["files"]}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
