"""kiln's own training loop: data-parallel training of the spec's network with PyTorch DDP, written against the
public training API (:mod:`kiln.tasks.training.api`) like any pipeline's own loop.

Every epoch ends with a checkpoint, so a restarted job resumes after the newest one with the same final weights as
an uninterrupted run: the data order is a function of (seed, epoch) only, and the checkpoint holds the model, the
optimizer and every rank's RNG state. On CUDA the forward pass runs under bf16 autocast.

The job around it (``python -m kiln.tasks.training --config cfg.json``) is :mod:`kiln.tasks.training.runner`;
``run_train`` and ``main`` are re-exported here for the callers that always found them here.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kiln.tasks.training.api import TrainContext, TrainedModel
from kiln.tasks.training.runner import main, param_checksum, run_train

__all__ = ["main", "param_checksum", "run_train", "train"]

log = logging.getLogger(__name__)

_EVAL_BATCH = 4096
#: Rows handed back as the example input the export traces with.
_EXAMPLE_ROWS = 8


class _ShardSampler:
    """The order of a rank's own rows in an epoch: a permutation seeded by ``seed + epoch`` (as
    ``DistributedSampler`` seeds it), padded by wrapping to ``num_samples`` so every rank takes as many steps. With
    one rank it is exactly ``DistributedSampler``'s order over the whole split."""

    def __init__(self, n_local: int, num_samples: int, seed: int) -> None:
        self.n_local, self.num_samples, self.seed, self.epoch = n_local, num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n_local, generator=g)
        repeats = math.ceil(self.num_samples / self.n_local)
        return (order.repeat(repeats) if repeats > 1 else order)[:self.num_samples]


@torch.no_grad()
def _evaluate(module: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str) -> dict[str, float]:
    """Validation metrics over a whole split (empty split: no metrics)."""
    if len(x) == 0:
        return {}
    module.eval()
    outs = torch.cat([module(x[i:i + _EVAL_BATCH]) for i in range(0, len(x), _EVAL_BATCH)]).float()
    module.train()
    if task == "classification":
        return {"val/loss": nn.functional.cross_entropy(outs, y).item(),
                "val/accuracy": (outs.argmax(1) == y).float().mean().item()}
    mse = nn.functional.mse_loss(outs, y).item()
    return {"val/loss": mse, "val/rmse": math.sqrt(mse)}


def train(ctx: TrainContext) -> TrainedModel:
    """Train the spec's network for ``epochs``, resuming after the newest checkpoint; checkpoint every epoch."""
    hp, device = ctx.hparams, ctx.device
    x_cpu, y_cpu, n_train = ctx.load_shard("train")  # this rank's rows only
    x_val_cpu, y_val_cpu = ctx.load_split("val")
    module = ctx.build_model()
    ckpt = ctx.load_checkpoint()  # restores this rank's RNG streams (or seeds them at a fresh start)
    start_epoch = 0
    if ckpt is not None:
        module.load_state_dict(ckpt.state["model_state"])
        start_epoch = ckpt.epoch
    model: nn.Module = module
    if ctx.distributed:
        model = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    opt_cls = torch.optim.Adam if hp["optimizer"] == "adam" else torch.optim.SGD
    optimizer = opt_cls(model.parameters(), lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
    if ckpt is not None:
        optimizer.load_state_dict(ckpt.state["optimizer_state"])

    x, y, x_val, y_val = x_cpu.to(device), y_cpu.to(device), x_val_cpu.to(device), y_val_cpu.to(device)
    loss_fn: nn.Module = nn.CrossEntropyLoss() if ctx.task == "classification" else nn.MSELoss()
    sampler = _ShardSampler(len(x), math.ceil(n_train / ctx.world_size), hp["seed"])
    bs, epochs, log_every = hp["batch_size"], hp["epochs"], hp["log_every_steps"]
    n_steps = math.ceil(sampler.num_samples / bs)
    # bf16 autocast on CUDA only (not exercised by the CPU test suite); CPU trains in float32.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    ctx.log("training %s: %d params, %d train / %d val rows, world_size %d, batch %d per rank, epochs %d-%d",
            ctx.task, sum(p.numel() for p in module.parameters()), n_train, len(x_val), ctx.world_size, bs,
            start_epoch + 1, epochs)

    loop_s, loop_samples = 0.0, 0
    for epoch in range(start_epoch + 1, epochs + 1):
        start = last_log = time.perf_counter()
        sampler.set_epoch(epoch)
        # np.fromiter: 4x faster than torch.tensor(list(...)), which would cost ~2% of a small model's epoch.
        order = sampler.order().to(device)
        losses: list[torch.Tensor] = []
        for step in range(n_steps):
            idx = order[step * bs:(step + 1) * bs]
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())  # no .item() per step: it would force a device sync
            if ctx.is_main and (step + 1) % log_every == 0:
                now = time.perf_counter()
                window = torch.stack(losses[-log_every:]).float().mean().item()
                ctx.log("epoch %d/%d step %d/%d loss %.4f lr %.1e %.0f ms/step", epoch, epochs, step + 1, n_steps,
                        window, optimizer.param_groups[0]["lr"], (now - last_log) * 1000 / log_every)
                last_log = now
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_s = time.perf_counter() - start
        # Sample-weighted mean loss over all ranks (the last batch may be short).
        sizes = torch.full((n_steps,), float(bs), dtype=torch.float64, device=device)
        sizes[-1] = sampler.num_samples - (n_steps - 1) * bs
        totals = torch.stack([(torch.stack(losses).double() * sizes).sum(), sizes.sum()])
        if ctx.distributed:
            dist.all_reduce(totals)
        global_samples = sampler.num_samples * ctx.world_size
        loop_s, loop_samples = loop_s + epoch_s, loop_samples + global_samples
        if ctx.is_main:
            metrics = {"train/loss": (totals[0] / totals[1]).item(), "train/samples_per_s": global_samples / epoch_s,
                       **_evaluate(module, x_val, y_val, ctx.task)}
            ctx.log("epoch %d/%d done in %.1f s", epoch, epochs, epoch_s)
            ctx.log_metrics(metrics, step=epoch)
        ctx.save_checkpoint({"model_state": module.state_dict(), "optimizer_state": optimizer.state_dict()},
                            epoch=epoch)
    example = x_cpu[:_EXAMPLE_ROWS].clone()  # not a view: it would keep (and export) the whole shard
    return TrainedModel(module, example, samples_per_s=loop_samples / loop_s if loop_s > 0 else None)
