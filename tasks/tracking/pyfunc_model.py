"""A registered kiln model as an MLflow Model: the pyfunc that predicts raw rows with the version's bundle.

Every registered version is an MLflow Model (models from code: this file is its ``python_model``) holding the
version's bundle as the artifact ``bundle``, so that anything that speaks MLflow serves it without kiln's server::

    model = mlflow.pyfunc.load_model("models:/penguins@champion")
    model.predict(raw_df)   # one row per input row: label, p_Adelie, p_Chinstrap, p_Gentoo (or: value)

The input is the raw columns the bundle's transform takes (extra columns are ignored; nulls mean missing, as in a
request). The rows go through exactly the path of a ``POST /predict`` on kiln's model server: the records
transform (:class:`kiln.tasks.features.records.RecordTransform`), the server's range check, the network, and the
server's answer mapped to columns: a classification's ``label`` (the most probable class, the first one on ties) and
``p_<class>`` (its ``probabilities``), a regression's ``value``. The numbers are the server's (float32, as float64).

kiln's loader travels with the model (MLflow's ``code_paths``: the static import closure of this file's kiln
imports, :func:`code_closure`), so a process without kiln loads it too. A process that has kiln installed uses its
own kiln instead: the copy must not shadow the installed package for the rest of the process (a notebook that loads
a model and then imports more of kiln).
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import Model
from mlflow.models.signature import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import AnyType, ColSpec, Schema, TensorSpec

if TYPE_CHECKING:
    from kiln.tasks.bundle.load import Bundle

log = logging.getLogger(__name__)

#: The pyfunc artifact (and folder under the model's ``artifacts/``) holding the bundle.
BUNDLE_ARTIFACT = "bundle"
#: Where the bundle lies inside a logged model (what :meth:`Registry.fetch_bundle` downloads).
MODEL_BUNDLE_PATH = f"artifacts/{BUNDLE_ARTIFACT}"
#: The model's folder for ``code_paths`` (MLflow's name; it is put first on ``sys.path`` when the model loads).
CODE_DIR = "code"
#: Column prefix of a class probability in the output.
PROBABILITY_PREFIX = "p_"
#: Distributions kiln's loader imports (the model's requirements, with ``onnxruntime`` for a bundle with ONNX).
REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "pyarrow", "orjson")
#: The ONNX file of a bundle (format 2) that has one: ``kiln.tasks.bundle.load.ONNX_FILE``, repeated because this
#: file imports kiln only once a kiln (installed, or the model's own copy) is on ``sys.path``.
ONNX_FILE = "model.onnx"
#: Largest difference allowed between a saved model's predictions and the bundle's on the sample rows.
PREDICTION_TOLERANCE = 1e-6


def output_columns(classes: tuple[str, ...] | list[str] | None) -> list[str]:
    """The output columns: ``label`` and ``p_<class>`` per class (classification) or ``value`` (regression)."""
    return ["value"] if classes is None else ["label", *(f"{PROBABILITY_PREFIX}{c}" for c in classes)]


class KilnBundleModel(PythonModel):
    """Raw rows in, the model server's predictions out (one row per input row, the input's index kept)."""

    bundle: Bundle

    def load_context(self, context: Any) -> None:
        _prefer_installed_kiln(Path(__file__).resolve().parent / CODE_DIR)
        from kiln.tasks.bundle.load import load_bundle

        self.bundle = load_bundle(context.artifacts[BUNDLE_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Predict raw rows.

        Args:
            context: MLflow's model context (unused: the bundle is loaded by :meth:`load_context`).
            model_input: the raw rows, holding every input column (what ``pd.DataFrame`` takes also does; the
                ``pd.DataFrame`` annotation keeps MLflow from validating against it, the signature does that).
            params: unused.

        Returns:
            :func:`output_columns` of the bundle, float64 probabilities or values.

        Raises:
            ValueError: an input column is missing (all missing ones named), a value is refused by the transform
                (named as ``records[i].column``, ``i`` the row's position), or the model returned non-finite values.
        """
        from kiln.tasks.features.records import RecordError, records_from_frame
        from kiln.tasks.serving.inputs import transform

        bundle = self.bundle
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [c for c in bundle.input_columns if c not in frame.columns]
        if missing:
            raise ValueError(f"the input lacks the column(s) {', '.join(missing)}; the model takes the raw columns "
                             f"{', '.join(bundle.input_columns)} (nulls allowed, extra columns ignored)")
        columns = output_columns(bundle.classes)
        if frame.empty:
            return pd.DataFrame({c: pd.Series(dtype=object if c == "label" else np.float64) for c in columns},
                                index=frame.index)
        try:
            # The server's path for the same rows as JSON records (records[i] is the i-th row).
            # infer_objects: numpy scalars in an object column become Python numbers, as JSON would give them.
            records = records_from_frame(frame[bundle.input_columns].infer_objects())
            y = bundle.predict_features(transform(bundle, records))
        except RecordError as exc:
            raise ValueError(f"{exc} (records[i] is the row at position i of the input)") from None
        if not np.isfinite(y).all():
            raise ValueError("the model returned non-finite values (kiln's server answers 500 for these rows)")
        if bundle.classes is None:
            return pd.DataFrame({"value": y.astype(np.float64)}, index=frame.index)
        out = pd.DataFrame(y.astype(np.float64), columns=columns[1:], index=frame.index)
        out.insert(0, "label", np.asarray(bundle.classes, dtype=object)[y.argmax(axis=1)])
        return out


def _prefer_installed_kiln(shipped: Path) -> None:
    """Import kiln from the installed package if there is one, else from the model's copy in ``shipped``.

    MLflow put ``shipped`` first on ``sys.path``; kiln's packages found there first would stand in for the installed
    ones for the rest of the process, and they are only the loader's part of kiln.
    """
    if not (shipped / "kiln").is_dir():
        return  # kiln's own file, not a model's copy
    entries = [p for p in sys.path if p and Path(p).resolve() == shipped]
    for entry in entries:
        sys.path.remove(entry)
    if "kiln.tasks" in sys.modules:
        return  # kiln is in use already: the installed one, or an earlier model's copy
    try:
        importlib.import_module("kiln.tasks.bundle.load")
        log.info("loading the kiln model with the installed kiln")
    except ImportError:
        for name in [m for m in sys.modules if m == "kiln" or m.startswith("kiln.")]:
            del sys.modules[name]
        sys.path[:0] = entries
        importlib.invalidate_caches()
        log.info("kiln is not installed: loading the kiln model with the copy of kiln's loader in %s", shipped)


def save_model(bundle_dir: Path, path: Path, mlflow_model: Model | None = None) -> Path:
    """Write the MLflow Model of the bundle ``bundle_dir`` to the new folder ``path``, and check it.

    The model holds the bundle (artifact ``bundle``), this file as its code, kiln's loader (:func:`code_closure`),
    the signature (:func:`model_signature`), five sample rows as its input example and pinned requirements
    (:func:`pip_requirements`). It is then loaded back and must predict the bundle's sample rows as the bundle does
    through the model server's path.

    Args:
        bundle_dir: a bundle folder (:func:`kiln.tasks.bundle.load.load_bundle` loads it).
        path: where to write the model (must not exist or be empty).
        mlflow_model: the ``MLmodel`` to fill (a logged model's ids), or ``None`` for a free-standing model.

    Raises:
        BundleError: ``bundle_dir`` is not a loadable bundle.
        ValueError: the saved model does not reproduce the bundle's predictions.
    """
    from kiln.tasks.bundle.load import load_bundle
    from kiln.tasks.features.records import records_from_frame

    bundle = load_bundle(bundle_dir)
    sample, _ = bundle.sample()
    with tempfile.TemporaryDirectory(prefix="kiln-mlflow-stage-") as tmp:
        stage = Path(tmp)
        shutil.copytree(bundle_dir, stage / BUNDLE_ARTIFACT)
        for relative, source in code_closure().items():
            (stage / CODE_DIR / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, stage / CODE_DIR / relative)
        mlflow.pyfunc.save_model(
            str(path), python_model=str(Path(__file__).resolve()), mlflow_model=mlflow_model,
            artifacts={BUNDLE_ARTIFACT: str(stage / BUNDLE_ARTIFACT)}, code_paths=[str(stage / CODE_DIR / "kiln")],
            signature=model_signature(bundle.signature), input_example=input_example(sample),
            pip_requirements=pip_requirements(bundle_dir),
            metadata={"kiln_bundle_format_version": bundle.manifest.get("format_version"), "kiln_task": bundle.task})
    answers = bundle.format_predictions(bundle.predict_records(records_from_frame(sample)))
    want = pd.DataFrame([{"value": a["value"]} if "value" in a else {"label": a["label"], **{
        f"{PROBABILITY_PREFIX}{c}": p for c, p in a["probabilities"].items()}} for a in answers])
    saved_path = list(sys.path)
    try:
        got = mlflow.pyfunc.load_model(str(path)).predict(input_example(sample, len(sample)))
    finally:
        sys.path[:] = saved_path  # the check loads the model in this process: its code folder is a temporary one
    if list(got.columns) != list(want.columns) or not _same(got, want):
        raise ValueError(f"the MLflow model saved in {path} does not predict the bundle {bundle_dir}'s sample rows "
                         "as the bundle does; please report this (kiln.tasks.tracking.pyfunc_model)")
    return path


def _same(got: pd.DataFrame, want: pd.DataFrame) -> bool:
    numbers = [c for c in want.columns if c != "label"]
    labels_equal = "label" not in want.columns or got["label"].tolist() == want["label"].tolist()
    return labels_equal and bool(np.allclose(got[numbers].to_numpy(np.float64), want[numbers].to_numpy(np.float64),
                                             rtol=0, atol=PREDICTION_TOLERANCE))


def pip_requirements(bundle_dir: Path) -> list[str]:
    """The model's requirements: what kiln's loader imports, pinned to this process's versions (public part)."""
    names = [*REQUIREMENTS, *(["onnxruntime"] if (Path(bundle_dir) / ONNX_FILE).is_file() else [])]
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in names]


def model_signature(signature: dict[str, Any]) -> ModelSignature:
    """The MLflow signature of a bundle: its raw input columns (all required) and :func:`output_columns`.

    The inputs are typed ``Any``: kiln's server takes a number as an int or a float and a category as a string,
    number or boolean, each nullable, and the records transform checks each value as the server does (naming the
    row and column). MLflow's column types would refuse part of that (an ``int64`` column where ``double`` is
    declared, a null in a ``long`` one), so the kinds stay in the bundle's ``signature.json``.

    Args:
        signature: the bundle's ``signature.json``.
    """
    inputs: list[ColSpec | TensorSpec] = [ColSpec(AnyType(), column["name"]) for column in signature["inputs"]]
    classes = signature["outputs"]["classes"]
    outputs: list[ColSpec | TensorSpec] = [ColSpec("string" if c == "label" else "double", c)
                                            for c in output_columns(classes)]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def input_example(sample: pd.DataFrame, rows: int = 5) -> pd.DataFrame:
    """The first ``rows`` sample rows as plain values (``None`` for missing), MLflow's input example."""
    head = sample.head(rows)
    return head.astype(object).where(head.notna(), None)


def code_closure() -> dict[str, Path]:
    """kiln's files this model may import: path under the model's ``code/`` folder to the source file.

    Every ``kiln`` import of this file, followed through each imported module (imports inside functions too, so a
    loader that picks a runtime lazily is covered; ``TYPE_CHECKING`` imports are not), with the packages' own
    ``__init__`` files. Static: only packages' ``__init__`` files are imported to find the modules.

    Raises:
        ImportError: an imported kiln module cannot be found.
    """
    files: dict[str, Path] = {}
    todo = sorted(_kiln_imports(Path(__file__)))
    while todo:
        name = todo.pop()
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ImportError(f"cannot find the kiln module {name} that the MLflow model's code imports")
        package = spec.submodule_search_locations is not None
        relative = "/".join(name.split(".")) + ("/__init__.py" if package else ".py")
        if relative in files:
            continue
        files[relative] = Path(spec.origin)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(2, len(parts)))  # parent packages (``kiln`` is a namespace)
        todo.extend(_kiln_imports(Path(spec.origin)))
    return files


def _kiln_imports(path: Path) -> set[str]:
    """The ``kiln.*`` modules ``path`` imports (``from kiln.a import b`` counts ``kiln.a.b`` too if it is one)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # What an ``if TYPE_CHECKING:`` block imports is never imported at run time.
    checking = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
                for statement in node.body for n in ast.walk(statement)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in checking:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kiln.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kiln."):
            module = node.module
            found.add(module)
            spec = importlib.util.find_spec(module)
            if spec is not None and spec.submodule_search_locations is not None:  # a package: names may be modules
                found |= {f"{module}.{a.name}" for a in node.names
                          if importlib.util.find_spec(f"{module}.{a.name}") is not None}
    return found


mlflow.models.set_model(KilnBundleModel())
