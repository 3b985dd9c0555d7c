"""Pipeline code that is wrong in the ways the train job must name: each function is one mistake."""

from __future__ import annotations

import torch
from torch import nn

NOT_CALLABLE = 3


def returns_a_dict(input_dim: int, n_outputs: int) -> dict:
    return {"weights": [1, 2]}


def wrong_width(input_dim: int, n_outputs: int) -> nn.Module:
    return nn.Linear(input_dim, n_outputs + 3)


def takes_no_options(input_dim: int, n_outputs: int) -> nn.Module:
    return nn.Linear(input_dim, n_outputs)


class Branchy(nn.Module):
    """Branches in Python on a tensor value: trains fine, cannot be exported."""

    def __init__(self, input_dim: int, n_outputs: int):
        super().__init__()
        self.a, self.b = nn.Linear(input_dim, n_outputs), nn.Linear(input_dim, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


def branchy(input_dim: int, n_outputs: int) -> nn.Module:
    return Branchy(input_dim, n_outputs)


def loop_returns_none(ctx):
    ctx.log("training, but forgetting to hand the model back")
    return None


def loop_returns_wrong_width(ctx):
    from kiln.tasks.training.api import TrainedModel

    x, _ = ctx.load_split("train")
    return TrainedModel(nn.Linear(ctx.input_dim, ctx.n_outputs + 1), x[:4])
