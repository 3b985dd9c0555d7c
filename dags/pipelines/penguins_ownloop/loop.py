"""penguins_ownloop's training loop: the pipeline's own network and loop, run by kiln through its training API.

kiln starts ``train`` on every rank of the job (torchrun, or a gang of containers) with the process group up, and
after it returns exports the model it hands back, evaluates, gates and serves it. The loop reaches kiln only
through ``ctx``: the hyper-parameters, the features, checkpoints and metrics.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from kiln.tasks.training.api import TrainContext, TrainedModel


class GatedMLP(nn.Module):
    """Two gated-linear-unit blocks with layer norm, then the class logits."""

    def __init__(self, input_dim: int, n_outputs: int, width: int, dropout: float):
        super().__init__()
        self.stem = nn.Linear(input_dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GLU(),
                                                  nn.Dropout(dropout)) for _ in range(2))
        self.head = nn.Linear(width, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def train(ctx: TrainContext) -> TrainedModel:
    """AdamW with a warm-up then cosine learning rate, label smoothing and gradient clipping."""
    hp = ctx.hparams
    x, y = ctx.load_split("train")
    x_val, y_val = ctx.load_split("val")
    x, y = x.to(ctx.device), y.to(ctx.device)
    torch.manual_seed(hp["seed"])  # the same initial weights on every rank
    module = GatedMLP(ctx.input_dim, ctx.n_outputs, int(hp.get("width", 32)), float(hp.get("dropout", 0.1)))
    module.to(ctx.device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
    warmup, epochs = int(hp.get("warmup_epochs", 3)), hp["epochs"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: (e + 1) / warmup if e < warmup else 0.5 * (1 + math.cos(math.pi * e / epochs)))

    first = 1
    checkpoint = ctx.load_checkpoint()  # also restores this rank's random streams
    if checkpoint is not None:
        module.load_state_dict(checkpoint.state["model"])
        optimizer.load_state_dict(checkpoint.state["optimizer"])
        schedule.load_state_dict(checkpoint.state["schedule"])
        first = checkpoint.epoch + 1
    model = DistributedDataParallel(module) if ctx.distributed else module
    loss_fn = nn.CrossEntropyLoss(label_smoothing=float(hp.get("label_smoothing", 0.05)))
    sampler = DistributedSampler(range(len(x)), num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                 seed=hp["seed"])
    batch = hp["batch_size"]
    for epoch in range(first, epochs + 1):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=ctx.device)
        model.train()
        total = torch.zeros((), device=ctx.device)
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            total += loss.detach() * len(idx)
        schedule.step()
        metrics = {"train/loss": total.item() / len(order), "train/lr": schedule.get_last_lr()[0]}
        if ctx.is_main and len(x_val):
            module.eval()
            with torch.no_grad():
                logits = module(x_val.to(ctx.device))
            metrics["val/accuracy"] = (logits.argmax(1).cpu() == y_val).float().mean().item()
        ctx.log_metrics(metrics, step=epoch)
        ctx.save_checkpoint({"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                             "schedule": schedule.state_dict()}, epoch=epoch)
    module.eval()
    return TrainedModel(module, x[:8].cpu())
