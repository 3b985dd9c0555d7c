"""A pipeline's own network for tests: a residual MLP with dropout (so a resume must restore the RNG streams) and
embeddings for the categorical columns when the factory is given the feature layout."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class TabularNet(nn.Module):
    def __init__(self, input_dim: int, n_outputs: int, width: int, depth: int, dropout: float, layout=None):
        super().__init__()
        self.layout = layout
        # One-hot blocks become embeddings (a linear map of a one-hot row is an embedding lookup).
        blocks = layout.categorical if layout is not None else ()
        self.n_numeric = input_dim - sum(b.size for b in blocks)
        self.embed = nn.ModuleList(nn.Linear(b.size, 4, bias=False) for b in blocks)
        self.spans = [(b.start, b.stop) for b in blocks]
        self.stem = nn.Linear(self.n_numeric + 4 * len(blocks), width)
        self.blocks = nn.Sequential(*(Block(width, dropout) for _ in range(depth)))
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedded = [emb(x[:, a:b]) for emb, (a, b) in zip(self.embed, self.spans, strict=True)]
        parts = [x[:, :self.n_numeric], *embedded]
        return self.head(self.blocks(self.stem(torch.cat(parts, dim=1))))


def build(input_dim: int, n_outputs: int, width: int = 16, depth: int = 2, dropout: float = 0.2,
          features=None) -> nn.Module:
    return TabularNet(input_dim, n_outputs, width, depth, dropout, features)
