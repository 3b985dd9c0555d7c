"""The pipeline's own code in a training job: importing the callables a spec names, hashing the code folder, and
building a ``model.type: custom`` network with checks that name the spec field and the fix.

No torch at module level: the train step and the launchers hash the code folder without it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from kiln.tasks.spec import ModelSpec

log = logging.getLogger(__name__)

#: Bounds of a code folder: it is source code, not data.
MAX_CODE_FILES = 2000
MAX_CODE_BYTES = 64 << 20
#: Rows of the probe batch a custom network is checked on.
PROBE_ROWS = 2

_SKIPPED_DIRS = {"__pycache__", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".venv", "node_modules"}
_path_lock = threading.Lock()


class UserCodeError(ValueError):
    """The pipeline's code cannot be used as the spec says: names the spec field, the reference and the fix."""

    def __init__(self, field: str, ref: str, problem: str):
        self.field, self.ref = field, ref
        super().__init__(f"{field} '{ref}': {problem}")


def code_hash(path: str | Path) -> str:
    """sha256 of a code folder: every file's relative path and bytes, in path order (caches and hidden folders
    left out), so the same code gives the same hash on every machine and in the training image.

    Raises:
        UserCodeError: not a folder, or more than :data:`MAX_CODE_FILES` files / :data:`MAX_CODE_BYTES` bytes.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise UserCodeError("code.path", str(path), "is not a folder; point code.path at the pipeline's code folder")
    files: list[Path] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        files += [Path(root) / n for n in names if not n.startswith(".") and not n.endswith((".pyc", ".pyo"))]
        if len(files) > MAX_CODE_FILES:
            raise UserCodeError("code.path", str(path), f"holds more than {MAX_CODE_FILES} files; keep data and "
                                "environments out of the code folder")
    digest, total = hashlib.sha256(), 0
    for file in sorted(files, key=lambda f: f.relative_to(folder).as_posix()):
        data = file.read_bytes()
        total += len(data)
        if total > MAX_CODE_BYTES:
            raise UserCodeError("code.path", str(path), f"holds more than {MAX_CODE_BYTES >> 20} MiB; keep data "
                                "out of the code folder (read it in the loop from ctx.features_dir or "
                                "ctx.raw_snapshot)")
        rel = file.relative_to(folder).as_posix().encode()
        digest.update(len(rel).to_bytes(4, "big") + rel + len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def _add_to_path(code_dir: str | None) -> None:
    if code_dir and code_dir not in sys.path:
        with _path_lock:
            if code_dir not in sys.path:
                sys.path.insert(0, code_dir)


def import_callable(ref: str, code_dir: str | None, *, field: str) -> Callable[..., Any]:
    """The callable ``ref`` names: ``module.path:name`` (from ``code_dir``, put first on ``sys.path`` once, or an
    installed package) or ``file.py:name`` (a file inside ``code_dir``).

    Raises:
        UserCodeError: the module or file is missing, importing it raised (the error inside is named), the
            attribute is missing or not callable.
    """
    target, sep, attr = ref.partition(":")
    if not sep or not target or not attr:
        raise UserCodeError(field, ref, "must be 'module.path:callable' or 'file.py:callable'")
    _add_to_path(code_dir)
    if target.endswith(".py"):
        module = _import_file(target, code_dir, field=field, ref=ref)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (target == exc.name or target.startswith(exc.name + ".")):
                where = f"in code.path {code_dir} nor in the installed packages" if code_dir else \
                    "in the installed packages (the pipeline has no code folder: set code.path)"
                raise UserCodeError(field, ref, f"module '{target}' was found neither {where}; check the module "
                                    "path (dots, not slashes) and the code folder") from exc
            raise UserCodeError(field, ref, f"importing module '{target}' failed: {type(exc).__name__}: {exc}; "
                                "add the missing package to code.requirements") from exc
        except Exception as exc:  # the user's module raised while importing: name what it raised
            raise UserCodeError(field, ref, f"importing module '{target}' failed: {type(exc).__name__}: {exc}; "
                                "fix the module") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))[:10]
            raise UserCodeError(field, ref, f"module '{target}' has no attribute '{attr}'; callables there: "
                                f"{', '.join(public) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserCodeError(field, ref, f"'{attr}' is a {type(obj).__name__}, not a function or class")
    return obj  # type: ignore[no-any-return]


def _import_file(target: str, code_dir: str | None, *, field: str, ref: str) -> Any:
    if not code_dir:
        raise UserCodeError(field, ref, "names a file, but the job has no code folder; set code.path")
    root = Path(code_dir).resolve()
    file = (root / target).resolve()
    if not file.is_relative_to(root):
        raise UserCodeError(field, ref, f"file '{target}' lies outside the code folder {root}")
    if not file.is_file():
        raise UserCodeError(field, ref, f"file '{target}' does not exist in the code folder {root}")
    name = "kiln_user_code." + file.relative_to(root).with_suffix("").as_posix().replace("/", ".")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None  # a .py file always has a loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise UserCodeError(field, ref, f"running '{target}' failed: {type(exc).__name__}: {exc}; fix the file, "
                            "or add a missing package to code.requirements") from exc
    return module


@dataclass(frozen=True)
class CategoricalSlice:
    """One categorical column's one-hot block in the feature matrix: columns ``start:stop``; the last one of the
    block stands for a value not seen in training (``__unknown__``)."""

    name: str
    start: int
    stop: int
    vocabulary: tuple[str, ...]

    @property
    def size(self) -> int:
        """Width of the block (``len(vocabulary) + 1``)."""
        return self.stop - self.start


@dataclass(frozen=True)
class FeatureLayout:
    """Where each raw column sits in the ``[n, input_dim]`` feature matrix: the scaled numeric columns first (in
    order, columns ``0:len(numeric)``), then one one-hot block per categorical column. Passed to a factory that
    takes a ``features`` argument, e.g. to embed categorical columns instead of using their one-hot blocks."""

    input_dim: int
    numeric: tuple[str, ...]
    categorical: tuple[CategoricalSlice, ...]

    @classmethod
    def from_feature_spec(cls, spec: dict[str, Any]) -> FeatureLayout:
        """The layout of a ``feature_spec.json`` (one without column lists: all columns numeric)."""
        input_dim = int(spec["input_dim"])
        if "numeric" not in spec and "categorical" not in spec:
            return cls(input_dim, tuple(f"f{i}" for i in range(input_dim)), ())
        numeric = tuple(c["name"] for c in spec.get("numeric", []))
        blocks, start = [], len(numeric)
        for col in spec.get("categorical", []):
            vocab = tuple(col["vocabulary"])
            blocks.append(CategoricalSlice(col["name"], start, start + len(vocab) + 1, vocab))
            start += len(vocab) + 1
        if start != input_dim:
            raise ValueError(f"feature_spec.json: columns add up to {start} but input_dim is {input_dim}; rerun "
                             "build_features")
        return cls(input_dim, numeric, tuple(blocks))

    @classmethod
    def load(cls, features_dir: str | Path) -> FeatureLayout:
        from kiln.tasks.features.transform import FEATURE_SPEC_FILE

        return cls.from_feature_spec(json.loads((Path(features_dir) / FEATURE_SPEC_FILE).read_text()))


def build_custom_model(spec: ModelSpec, code_dir: str | None, layout: FeatureLayout, n_outputs: int) -> nn.Module:
    """Call ``model.factory`` and check what it returns: an ``nn.Module`` mapping ``[n, input_dim]`` float32 rows
    to ``[n, n_outputs]``.

    Raises:
        UserCodeError: the factory does not import, raises, returns something else, or its output has another
            shape; the message names ``model.factory`` and the fix.
    """
    import torch
    from torch import nn

    assert spec.factory is not None  # ModelSpec requires it for type custom
    factory = import_callable(spec.factory, code_dir, field="model.factory")
    kwargs: dict[str, Any] = {"input_dim": layout.input_dim, "n_outputs": n_outputs, **spec.options}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature: pass no layout
        params = {}  # type: ignore[assignment]
    if "features" in params:
        kwargs["features"] = layout
    try:
        module = factory(**kwargs)
    except TypeError as exc:
        raise UserCodeError("model.factory", spec.factory, f"calling it with {sorted(kwargs)} failed: {exc}; it "
                            "must accept input_dim and n_outputs, and model.options as keyword arguments") from exc
    if not isinstance(module, nn.Module):
        raise UserCodeError("model.factory", spec.factory, f"returned a {type(module).__name__}, not a "
                            "torch.nn.Module; return the network (an nn.Module instance) from the factory")
    check_output_shape(module, layout.input_dim, n_outputs, field="model.factory", ref=spec.factory,
                       example=torch.zeros(PROBE_ROWS, layout.input_dim))
    return module


def check_output_shape(module: nn.Module, input_dim: int, n_outputs: int, *, field: str, ref: str,
                       example: Any) -> None:
    """Run ``module`` on ``example`` (without gradients, its training/eval mode restored) and check that the output
    is a float tensor ``[len(example), n_outputs]``.

    Raises:
        UserCodeError: the forward pass raises, or the output has another type or shape.
    """
    import torch

    was_training = module.training
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    try:
        module.eval()
        with torch.no_grad():
            out = module(example.to(device))
    except Exception as exc:
        raise UserCodeError(field, ref, f"the network fails on a [{len(example)}, {input_dim}] float32 batch: "
                            f"{type(exc).__name__}: {exc}; forward() must take the feature matrix") from exc
    finally:
        module.train(was_training)
    want = [len(example), n_outputs]
    if not isinstance(out, torch.Tensor) or list(out.shape) != want or not out.is_floating_point():
        found = f"shape {list(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserCodeError(field, ref, f"the network maps a {[len(example), input_dim]} batch to {found}, but "
                            f"this task needs float {want} (one {'logit per class' if n_outputs > 1 else 'value'} "
                            "per row); make the last layer output n_outputs values and return a single tensor")
