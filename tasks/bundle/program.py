"""The exported program: a trained network and its output head as a ``torch.export`` program (``model.pt2``).

The training job exports the network it trained (kiln's or the user's) at its end, where the network's Python
code and the pipeline's requirements are importable; everything after it (evaluate, the bundle, the model server,
the MLflow model) loads the program without that code. ``torch.export`` replaces TorchScript, which PyTorch marks
deprecated: it captures the whole graph ahead of time or fails, so an exported model never silently differs from
the trained one, and it is the input of the ONNX converter.

The program maps float32 features ``[n, d]`` (any ``n >= 1``) to what :class:`Servable` gives: softmax
probabilities ``[n, k]`` for classification, values ``[n]`` for regression.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.tasks.bundle.parity import PARITY_RULE, scaled_difference
from kiln.tasks.storage.artifacts import atomic_write_bytes

log = logging.getLogger(__name__)

#: File name of the exported program, in the ``train`` output and in a bundle.
PROGRAM_FILE = "model.pt2"
#: Largest difference allowed between the program's predictions and the trained module's (:data:`PARITY_RULE`).
PROGRAM_TOLERANCE = 1e-5
#: Most rows a batch may have (the dynamic batch dimension's upper bound).
MAX_BATCH = 1 << 20
_META_FILE = "kiln_meta.json"
_PREDICT_BATCH = 4096
_EXPORT_RULES = ("torch.export traces forward() once for a symbolic batch size: no Python branches or loops on "
                 "tensor values (use torch.where), no .item()/.tolist()/numpy inside forward, no batch size fixed "
                 "in view/reshape (use -1 or x.shape[0]), no changes of module attributes, only torch operations on "
                 "the input")


class ModelExportError(ValueError):
    """The trained network cannot be exported faithfully; the message names the operation or line and the fix."""


class Servable(nn.Module):
    """A network plus kiln's output head, so that what is exported needs no training code."""

    def __init__(self, network: nn.Module, classification: bool):
        super().__init__()
        self.network = network
        self.classification = classification

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        if self.classification:
            return torch.softmax(out, dim=1)
        return out.squeeze(1)


def export_program(network: nn.Module, example: torch.Tensor, task: str, *, source: str = "the model"
                   ) -> torch.export.ExportedProgram:
    """Export ``network`` with its output head, for any batch size, and check it against the eager module.

    Args:
        network: the trained module (put in eval mode here); its input is ``[n, d]`` float32 features.
        example: a batch of real inputs ``[n, d]`` (``n >= 1``) to trace and check with.
        task: ``classification`` (softmax head) or ``regression`` (values).
        source: where the network comes from, for error messages (e.g. ``model.factory 'resmlp:build'``).

    Raises:
        ModelExportError: ``torch.export`` fails (the message quotes the failing operation and the user's line), or
            the program's predictions differ from the module's by more than :data:`PROGRAM_TOLERANCE`.
    """
    if not isinstance(example, torch.Tensor) or example.ndim != 2 or len(example) == 0:
        shape = list(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        raise ModelExportError(f"{source}: the example input must be a float32 tensor [n, input_dim] with n >= 1, "
                               f"found {shape}; pass a batch of training features (e.g. x_train[:8])")
    servable = Servable(network, task == "classification").eval()
    example = example.detach().float().cpu()
    # Two rows at least: torch.export specialises a dimension traced at size 1, which would fix the batch size.
    trace = example if len(example) >= 2 else example.repeat(2, 1)
    servable.cpu()
    with torch.no_grad():
        if not bool(torch.isfinite(servable(trace)).all()):  # else the parity check below would blame the export
            raise ModelExportError(f"{source} predicts non-finite values for the example rows: training diverged; "
                                   "lower training.learning_rate, or check the features and the loss")
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        program = torch.export.export(servable, (trace,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as exc:  # torch.export raises many types (UserError, Unsupported, guard errors)
        raise ModelExportError(f"{source} cannot be exported with torch.export: {_export_problem(exc)}. "
                               f"Fix the network's forward(): {_EXPORT_RULES}") from None
    _refuse_custom_operators(program, source)
    # Checked on sizes other than the traced one, so that a shape specialised during tracing is caught.
    probe = torch.cat([trace, trace[:1]])
    with torch.no_grad():
        for rows in (probe, trace[:1]):
            want, got = servable(rows), program.module()(rows)
            diff = float(np.max(scaled_difference(got.numpy(), want.numpy()))) if got.shape == want.shape \
                else math.inf
            if not diff <= PROGRAM_TOLERANCE:
                raise ModelExportError(
                    f"{source}: the exported program's predictions for a batch of {len(rows)} differ from the "
                    f"trained module's by {diff:.3g} (allowed {PROGRAM_TOLERANCE:g}, {PARITY_RULE}); forward() "
                    f"behaves differently when traced: {_EXPORT_RULES}")
    return program


#: Operator namespaces every torch loads: a program of these alone loads without the pipeline's code.
_STANDARD_NAMESPACES = frozenset({"aten", "prims"})


def _refuse_custom_operators(program: torch.export.ExportedProgram, source: str) -> None:
    """Fail on an operator that the user's code (or a requirement) registered: the program would save, but no
    process without that code (evaluate, the model server) could load it."""
    for node in program.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) \
                and target.namespace not in _STANDARD_NAMESPACES:
            where = (node.meta.get("stack_trace") or "").strip().splitlines()
            raise ModelExportError(
                f"{source} calls the custom operator {target.name()}"
                f"{' (' + where[-2].strip() + ': ' + where[-1].strip() + ')' if len(where) >= 2 else ''}; the "
                "exported model is loaded without the pipeline's code, where that operator does not exist. Write "
                "it with torch operations instead")


def _export_problem(exc: BaseException) -> str:
    """The useful part of a ``torch.export`` error: its first lines and the user's source line it points at."""
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    head = " ".join(lines[:3])[:600] or type(exc).__name__
    where = re.search(r'File "([^"]+)", line (\d+), in (\w+)\s*\n\s*(.+)', text)
    if where is None:  # no user frame in the message: take the innermost frame outside torch from the traceback
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if "/torch/" not in f.filename and f.filename != __file__]
        if frames:
            f = frames[-1]
            return f"{type(exc).__name__}: {head} (at {f.filename}:{f.lineno} in {f.name}: {f.line})"
        return f"{type(exc).__name__}: {head}"
    file, line, func, code = where.groups()
    return f"{type(exc).__name__}: {head} (at {file}:{line} in {func}: {code.strip()})"


def save_program(program: torch.export.ExportedProgram, path: str | Path, meta: dict[str, Any]) -> Path:
    """Atomically write ``program`` to ``path`` with ``meta`` (JSON) stored inside the file."""
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={_META_FILE: json.dumps(meta, sort_keys=True, default=str)})
    return atomic_write_bytes(path, buf.getvalue())


@dataclass
class LoadedProgram:
    """An exported program, ready to run on CPU, and the metadata saved with it."""

    module: nn.Module
    meta: dict[str, Any]
    task: str
    program: torch.export.ExportedProgram | None = None
    """The program itself (for :func:`program_runner` and the ONNX converter)."""

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probabilities ``[n, k]`` (classification) or values ``[n]`` (regression), float32."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        outs = [self.module(torch.from_numpy(x[i:i + _PREDICT_BATCH])) for i in range(0, len(x), _PREDICT_BATCH)]
        if not outs:
            n_out = int(self.meta.get("n_outputs", 1))
            return np.zeros((0, n_out) if self.task == "classification" else (0,), np.float32)
        return torch.cat(outs).numpy()


def load_program(path: str | Path) -> LoadedProgram:
    """Load a program written by :func:`save_program` (a folder is taken to hold :data:`PROGRAM_FILE`).

    Raises:
        ModelExportError: the file is missing or cannot be loaded by this torch version.
    """
    path = Path(path)
    if path.is_dir():
        path = path / PROGRAM_FILE
    if not path.is_file():
        raise ModelExportError(f"{path} does not exist; the train step writes it at the end of training: run "
                               "train (again) with this kiln version")
    extra = {_META_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # a truncated or foreign file raises from several layers (zip, pickle, torch)
        raise ModelExportError(f"{path} cannot be loaded by torch {torch.__version__}: {exc}; re-run train with "
                               "this torch version") from None
    meta = json.loads(extra[_META_FILE] or "{}")
    return LoadedProgram(program.module(), meta, str(meta.get("task", "classification")), program)


_WEIGHT_INPUTS = {"PARAMETER", "BUFFER", "CONSTANT_TENSOR"}


def program_runner(program: torch.export.ExportedProgram) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fast callable of ``program``: its graph with the weights bound, one float32 ``[n, d]`` tensor in, out.

    ``program.module()`` flattens the arguments with pytree and checks every input against the exported shape
    guards on each call: about 100 µs of Python, several times what a small network itself takes (a model server
    pays it per batch). The caller checks what the guards would (``x`` is float32 ``[n, d]``, ``n >= 1``, the
    program was exported for any ``n``); a program whose graph takes or gives more than weights, constants, one
    input and one output (buffer mutations, tokens, custom objects) runs through ``program.module()``.
    """
    sig = program.graph_signature
    kinds = [spec.kind.name for spec in sig.input_specs]
    if kinds.count("USER_INPUT") != 1 or not set(kinds) <= _WEIGHT_INPUTS | {"USER_INPUT"} \
            or [spec.kind.name for spec in sig.output_specs] != ["USER_OUTPUT"]:
        module = program.module()
        return lambda x: module(x)
    weights = {**program.state_dict, **program.constants}
    bound = [None if kind == "USER_INPUT" else weights[spec.target].detach()
             for kind, spec in zip(kinds, sig.input_specs, strict=True)]
    slot = kinds.index("USER_INPUT")
    before, after = tuple(bound[:slot]), tuple(bound[slot + 1:])
    forward = program.graph_module.forward
    return lambda x: forward(*before, x, *after)[0]
