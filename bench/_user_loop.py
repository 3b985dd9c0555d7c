"""A pipeline's own training loop on kiln's training API: ``bench/_plain_ddp.py`` ported to ``TrainContext``.

The steps are the plain script's, line for line (same sharding, model, optimizer, loss all-reduce); what the
platform gives comes through the context instead: the features (``load_split``), the network (``build_model``),
the rank layout and device, the hyper-parameters, resuming (``load_checkpoint``), a checkpoint each epoch
(``save_checkpoint``) and the epoch's metrics (``log_metrics``). ``train_harness --compare user-loop`` runs it as
``training.entrypoint`` under torchrun (``python -m kiln.tasks.training``), copied into a code folder of its own.

Benchmark instrumentation, the same as the plain script's and outside the timed epochs: with
``ctx.params["turn_file"]`` the epochs take turns with the plain script's (:func:`take_turn`), and after the last
epoch rank 0 writes the per-epoch seconds of the training steps, of each of the two API calls and of the whole
epoch (the calls included) to ``ctx.params["timings_file"]``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kiln.tasks.training.api import TrainContext, TrainedModel

_TURN_POLL_S, _TURN_TIMEOUT_S = 0.002, 300.0


def shard(n: int, world_size: int, rank: int, seed: int, epoch: int) -> torch.Tensor:
    """This rank's rows for ``epoch``, in ``DistributedSampler``'s order (the plain script's function)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    total = math.ceil(n / world_size) * world_size
    order = torch.cat([order, order[:total - n]])
    return order[rank:total:world_size]


def take_turn(turn_file: str | None, turn: int) -> None:
    """Wait until the counter in ``turn_file`` reaches ``turn`` (no file: no waiting). Two jobs alive at once take
    turns epoch by epoch, so each epoch of one side runs next to one of the other in the same machine state."""
    if turn_file is None:
        return
    deadline = time.monotonic() + _TURN_TIMEOUT_S
    while int(Path(turn_file).read_text() or -1) < turn:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{turn_file}: turn {turn} did not come within {_TURN_TIMEOUT_S:.0f} s")
        time.sleep(_TURN_POLL_S)


def pass_turn(turn_file: str | None, turn: int) -> None:
    """Hand the turn after ``turn`` to the other job (rank 0, atomically)."""
    if turn_file is not None:
        Path(turn_file + ".tmp").write_text(str(turn + 1))
        os.replace(turn_file + ".tmp", turn_file)


def train(ctx: TrainContext) -> TrainedModel:
    hp = ctx.hparams
    x, y = ctx.load_split("train")
    module = ctx.build_model()
    ckpt = ctx.load_checkpoint()
    if ckpt is not None:
        module.load_state_dict(ckpt.state["model"])
    model = DistributedDataParallel(module) if ctx.distributed else module
    optimizer = torch.optim.Adam(model.parameters(), lr=hp["learning_rate"])
    if ckpt is not None:
        optimizer.load_state_dict(ckpt.state["optimizer"])
    loss_fn = nn.CrossEntropyLoss()
    bs, seed = hp["batch_size"], hp["seed"]
    per_rank = math.ceil(len(x) / ctx.world_size)
    n_steps = math.ceil(per_rank / bs)
    turn_file, slot = ctx.params.get("turn_file"), ctx.params.get("turn_slot", 0)

    steps_s, log_s, checkpoint_s, epoch_s = [], [], [], []
    for epoch in range((ckpt.epoch if ckpt else 0) + 1, hp["epochs"] + 1):
        turn = 2 * (epoch - 1) + (epoch - 1 + slot) % 2
        take_turn(turn_file, turn)
        start = time.perf_counter()
        order = shard(len(x), ctx.world_size, ctx.rank, seed, epoch)
        losses: list[torch.Tensor] = []
        for step in range(n_steps):
            idx = order[step * bs:(step + 1) * bs]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        steps_end = time.perf_counter()
        sizes = torch.full((n_steps,), float(bs), dtype=torch.float64)
        sizes[-1] = per_rank - (n_steps - 1) * bs
        totals = torch.stack([(torch.stack(losses).double() * sizes).sum(), sizes.sum()])
        if ctx.distributed:
            dist.all_reduce(totals)
        log_start = time.perf_counter()
        ctx.log_metrics({"train/loss": (totals[0] / totals[1]).item(),
                         "train/samples_per_s": per_rank * ctx.world_size / (steps_end - start)}, step=epoch)
        save_start = time.perf_counter()
        ctx.save_checkpoint({"model": module.state_dict(), "optimizer": optimizer.state_dict()}, epoch=epoch)
        end = time.perf_counter()
        if ctx.is_main:
            pass_turn(turn_file, turn)
        steps_s.append(steps_end - start)
        log_s.append(save_start - log_start)
        checkpoint_s.append(end - save_start)
        epoch_s.append(end - start)

    take_turn(turn_file, 2 * hp["epochs"])  # the other job's last epoch runs alone, not beside this job's exit
    if ctx.is_main:
        Path(ctx.params["timings_file"]).write_text(json.dumps({
            "steps_s": steps_s, "log_s": log_s, "checkpoint_s": checkpoint_s, "epoch_s": epoch_s,
            "samples_per_epoch": per_rank * ctx.world_size}))
    return TrainedModel(module, x[:8])
