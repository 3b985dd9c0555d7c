"""A pipeline's own network: a residual MLP that embeds the categorical columns instead of feeding their one-hot
blocks. kiln calls ``build`` with the feature width, the number of outputs, the spec's ``model.options`` and the
feature layout, trains it with its own loop, and exports it; serving needs none of this file."""

from __future__ import annotations

import torch
from torch import nn

from kiln.tasks.training.api import FeatureLayout


class ResidualBlock(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResMLP(nn.Module):
    """Numeric columns as they are, each categorical column as a learned vector, then residual blocks."""

    def __init__(self, features: FeatureLayout, n_outputs: int, width: int, depth: int, embed_dim: int,
                 dropout: float):
        super().__init__()
        self.n_numeric = len(features.numeric)
        self.spans = [(c.start, c.stop) for c in features.categorical]
        # The one-hot block's last column is "a value not seen in training": it gets a vector of its own.
        self.embeddings = nn.ModuleList(nn.Embedding(c.size, embed_dim) for c in features.categorical)
        self.stem = nn.Linear(self.n_numeric + embed_dim * len(self.spans), width)
        self.blocks = nn.Sequential(*(ResidualBlock(width, dropout) for _ in range(depth)))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # argmax of a one-hot block is the category's index: a tensor operation, so the network exports.
        embedded = [emb(x[:, a:b].argmax(dim=1)) for emb, (a, b) in zip(self.embeddings, self.spans, strict=True)]
        return self.head(self.blocks(self.stem(torch.cat([x[:, :self.n_numeric], *embedded], dim=1))))


def build(input_dim: int, n_outputs: int, features: FeatureLayout, width: int = 64, depth: int = 2,
          embed_dim: int = 4, dropout: float = 0.1) -> nn.Module:
    """The network for ``model.type: custom`` (``model.factory: "resmlp:build"``)."""
    if features.input_dim != input_dim:
        raise ValueError(f"the feature layout is {features.input_dim} wide but input_dim is {input_dim}")
    return ResMLP(features, n_outputs, width, depth, embed_dim, dropout)
