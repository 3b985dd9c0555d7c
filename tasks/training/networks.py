"""Networks for the ``train`` step and the saved-model format that ``evaluate`` and serving load."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.tasks.spec import ModelSpec, TaskType
from kiln.tasks.storage.artifacts import atomic_write_bytes

log = logging.getLogger(__name__)

#: File name of the trained model inside the ``train`` step's output folder.
MODEL_FILE = "model.pt"


class MLP(nn.Module):
    """Fully connected network for tabular features."""

    def __init__(self, input_dim: int, n_outputs: int, hidden_sizes: list[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, n_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """3x3 convolutions with ReLU and 2x2 max-pooling, then one dense layer; input is a flat row of pixels."""

    def __init__(self, image_shape: tuple[int, int], n_outputs: int, channels: list[int], hidden: int,
                 dropout: float = 0.0):
        super().__init__()
        self.image_shape = image_shape
        layers: list[nn.Module] = []
        in_ch, (h, w) = 1, image_shape
        for ch in channels:
            layers += [nn.Conv2d(in_ch, ch, kernel_size=3, padding=1), nn.ReLU()]
            if h >= 2 and w >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            in_ch = ch
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten(), nn.Linear(in_ch * h * w, hidden), nn.ReLU()]
        if dropout:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(hidden, n_outputs))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, *self.image_shape)))


def build_model(spec: ModelSpec, input_dim: int, n_outputs: int) -> nn.Module:
    """Construct the network a spec describes.

    Raises:
        ValueError: a CNN whose ``image_shape`` does not match the number of feature columns, or a custom model
            (built by its factory in the training job: :class:`kiln.tasks.training.api.TrainContext`).
    """
    if spec.type == "custom":
        raise ValueError(f"model.type 'custom' ({spec.factory}) is built by the pipeline's factory inside the "
                         "training job, not here; load the exported program (model.pt2) with "
                         "kiln.tasks.bundle.program.load_program")
    if spec.type == "cnn":
        assert spec.image_shape is not None  # guaranteed by ModelSpec validation
        h, w = spec.image_shape
        if h * w != input_dim:
            raise ValueError(f"model.image_shape {h}x{w}={h * w} does not match the {input_dim} feature columns; "
                             "set image_shape so that height*width equals the number of pixel columns")
        return SmallCNN((h, w), n_outputs, list(spec.channels), spec.hidden_sizes[0], spec.dropout)
    return MLP(input_dim, n_outputs, list(spec.hidden_sizes), spec.dropout)


@dataclass
class LoadedModel:
    """A trained network in eval mode and the metadata saved with it."""

    module: nn.Module
    meta: dict[str, Any]

    @property
    def task(self) -> TaskType:
        return self.meta["task"]


def save_model(path: str | Path, module: nn.Module, *, model_spec: ModelSpec, input_dim: int, n_outputs: int,
               task: TaskType, extra: dict[str, Any] | None = None) -> Path:
    """Atomically save weights plus everything needed to rebuild the network (and the config that made it)."""
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "meta": {"model_spec": model_spec.model_dump(mode="json"), "input_dim": input_dim,
                 "n_outputs": n_outputs, "task": task, **(extra or {})},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_model(model_dir: str | Path) -> LoadedModel:
    """Load ``model.pt`` from a ``train`` output folder (a network of kiln's own, trained by kiln's loop).

    Raises:
        ValueError: the model was built or trained by the pipeline's own code (load ``model.pt2`` instead).
    """
    payload = torch.load(Path(model_dir) / MODEL_FILE, map_location="cpu", weights_only=False)
    meta = payload["meta"]
    if not meta.get("rebuildable", True):
        raise ValueError(f"the model in {model_dir} was built by the pipeline's own code (model.factory "
                         f"{meta.get('factory')!r}, training.entrypoint {meta.get('entrypoint')!r}) and cannot be "
                         "rebuilt here; load the exported program (model.pt2) with "
                         "kiln.tasks.bundle.program.load_program")
    module = build_model(ModelSpec.model_validate(meta["model_spec"]), meta["input_dim"], meta["n_outputs"])
    module.load_state_dict(payload["state_dict"])
    module.eval()
    return LoadedModel(module, meta)


@torch.no_grad()
def predict(model: LoadedModel, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Class probabilities (classification, shape ``[n, classes]``) or values (regression, shape ``[n]``)."""
    outs = []
    for i in range(0, len(x), batch_size):
        out = model.module(torch.as_tensor(x[i:i + batch_size], dtype=torch.float32))
        outs.append(torch.softmax(out, dim=1) if model.task == "classification" else out.squeeze(1))
    if not outs:
        return np.zeros((0, model.meta["n_outputs"]) if model.task == "classification" else (0,), np.float32)
    return torch.cat(outs).numpy()
