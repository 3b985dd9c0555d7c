"""A pipeline's own training loop, written to kiln's public API only (``kiln.tasks.training.api``), for the Docker
test of user images (``tests/integration/test_docker_user_image.py``).

It imports ``tabulate``, a requirement of the pipeline that kiln's training image lacks, so a job that runs at all
proves the user image installed it; its summary line says where the loop was imported from and how many rows the
raw snapshot has (mounted into the containers for loops that build their own features).
"""

from __future__ import annotations

import pyarrow.parquet as pq
import tabulate
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kiln.tasks.training.api import TrainContext, TrainedModel


class TinyNet(nn.Module):
    """One hidden layer; ``training.params.width`` wide."""

    def __init__(self, input_dim: int, n_outputs: int, width: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_dim, width), nn.ReLU(), nn.Linear(width, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def train(ctx: TrainContext) -> TrainedModel:
    x, y = ctx.load_split("train")
    torch.manual_seed(ctx.hparams["seed"])  # the same initial weights on every rank
    net = TinyNet(ctx.input_dim, ctx.n_outputs, int(ctx.params.get("width", 16))).to(ctx.device)
    model = DistributedDataParallel(net) if ctx.distributed else net
    optimizer = torch.optim.SGD(model.parameters(), lr=ctx.hparams["learning_rate"])
    start = 0
    checkpoint = ctx.load_checkpoint()
    if checkpoint is not None:
        net.load_state_dict(checkpoint.state["model"])
        optimizer.load_state_dict(checkpoint.state["optimizer"])
        start = checkpoint.epoch
    # An equal share per rank: DDP needs the same number of steps everywhere.
    per_rank = len(x) // ctx.world_size
    xs, ys = x[ctx.rank * per_rank:(ctx.rank + 1) * per_rank], y[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
    batch = ctx.hparams["batch_size"]
    for epoch in range(start + 1, ctx.hparams["epochs"] + 1):
        order = torch.randperm(per_rank)
        total = 0.0
        for i in range(0, per_rank - batch + 1, batch):
            rows = order[i:i + batch]
            loss = nn.functional.cross_entropy(model(xs[rows].to(ctx.device)), ys[rows].to(ctx.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        ctx.save_checkpoint({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, epoch=epoch)
        ctx.log_metrics({"train/loss": total / max(per_rank // batch, 1)}, step=epoch)
    raw_rows = pq.read_metadata(ctx.raw_snapshot).num_rows if ctx.raw_snapshot else None
    ctx.log("user loop summary:\n%s", tabulate.tabulate([["loop", __file__], ["raw rows", raw_rows]],
                                                         tablefmt="plain"))
    return TrainedModel(net, x[:8])
