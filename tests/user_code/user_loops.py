"""Training loops a pipeline brings itself, written against kiln's training API only."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kiln.tasks.training.api import TrainContext, TrainedModel


def _shard(ctx: TrainContext, n: int, epoch: int) -> torch.Tensor:
    """This rank's rows of the epoch: a permutation fixed by (seed, epoch), strided over the ranks."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.hparams["seed"] * 1000 + epoch))
    return order[ctx.rank::ctx.world_size]


def _epoch(ctx, model, optimizer, x, y, epoch) -> float:
    loss_fn = nn.CrossEntropyLoss()
    idx, bs, total = _shard(ctx, len(x), epoch), ctx.hparams["batch_size"], 0.0
    for start in range(0, len(idx) - bs + 1, bs):  # whole batches only: every rank takes the same steps
        batch = idx[start:start + bs]
        optimizer.zero_grad()
        loss = loss_fn(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total


def train_with_checkpoints(ctx: TrainContext) -> TrainedModel:
    """Resumable: checkpoints every epoch through the API; ``params.pause_s`` slows each epoch down."""
    x, y = ctx.load_split("train")
    module = ctx.build_model()
    optimizer = torch.optim.SGD(module.parameters(), lr=ctx.hparams["learning_rate"], momentum=0.9)
    first = 1
    ckpt = ctx.load_checkpoint()
    if ckpt is not None:
        module.load_state_dict(ckpt.state["model"])
        optimizer.load_state_dict(ckpt.state["optimizer"])
        first = ckpt.epoch + 1
    model = DistributedDataParallel(module) if ctx.distributed else module
    for epoch in range(first, ctx.hparams["epochs"] + 1):
        loss = _epoch(ctx, model, optimizer, x, y, epoch)
        time.sleep(ctx.params.get("pause_s", 0))
        ctx.log_metrics({"train/loss_sum": loss}, step=epoch)
        ctx.save_checkpoint({"model": module.state_dict(), "optimizer": optimizer.state_dict()}, epoch=epoch)
    return TrainedModel(module, x[:8])


def train_without_checkpoints(ctx: TrainContext) -> TrainedModel:
    """Never checkpoints. With ``params.fail_once``: rank 1 crashes on the first try (it leaves that file)."""
    x, y = ctx.load_split("train")
    module = ctx.build_model()
    model = DistributedDataParallel(module) if ctx.distributed else module
    optimizer = torch.optim.SGD(module.parameters(), lr=ctx.hparams["learning_rate"])
    marker = ctx.params.get("fail_once")
    for epoch in range(1, ctx.hparams["epochs"] + 1):
        if marker and ctx.rank == 1 and not Path(marker).exists():
            Path(marker).write_text("crashed once")
            raise RuntimeError("out of disk space while writing scratch data")
        ctx.log_metrics({"train/loss_sum": _epoch(ctx, model, optimizer, x, y, epoch)}, step=epoch)
    return TrainedModel(model, x[:8])  # a DDP wrapper: kiln unwraps it


def train_forever(ctx: TrainContext) -> TrainedModel:
    """Never checkpoints and never ends: a SIGTERM only sets ``ctx.stop_requested``, which it never reads, so only a
    kill stops it."""
    ctx.log("looping until killed")
    while True:
        time.sleep(0.1)
