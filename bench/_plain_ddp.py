"""A plain torchrun DDP training script: the peer of ``bench/_user_loop.py`` in ``train_harness --compare user-loop``.

What a team writes without a platform (the PyTorch DDP examples): ``init_process_group``, its own
``DistributedSampler``-style sharding, a ``DistributedDataParallel`` MLP, Adam, a log line and a ``torch.save``
checkpoint from rank 0 each epoch. It imports nothing from kiln. ``bench/_user_loop.py`` is the same loop, step for
step, written against kiln's training API; both end with bit-identical weights, which the harness checks.

Run: ``torchrun --standalone --nproc_per_node=2 bench/_plain_ddp.py --features F --checkpoint-dir C --timings T``.
With ``--turn-file`` its epochs take turns with the user loop's (benchmark instrumentation outside the timed
epochs, as in ``bench/_user_loop.py``). Rank 0 writes ``T``: per-epoch seconds of the training steps, of the log
line, of the checkpoint and of the whole epoch (steps, loss all-reduce, log line, checkpoint), the global samples
per epoch and the sha256 of the final weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger("plain_ddp")
_TURN_POLL_S, _TURN_TIMEOUT_S = 0.002, 300.0


def shard(n: int, world_size: int, rank: int, seed: int, epoch: int) -> torch.Tensor:
    """This rank's rows for ``epoch``, in ``DistributedSampler``'s order: a permutation seeded by (seed, epoch),
    padded to a multiple of the world size with its own first rows, every ``world_size``-th row from ``rank``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    total = math.ceil(n / world_size) * world_size
    order = torch.cat([order, order[:total - n]])
    return order[rank:total:world_size]


def take_turn(turn_file: Path | None, turn: int) -> None:
    """Benchmark instrumentation (``bench/_user_loop.py``'s): wait until the counter in ``turn_file`` reaches
    ``turn``, so that this job's epochs take turns with the user loop's."""
    if turn_file is None:
        return
    deadline = time.monotonic() + _TURN_TIMEOUT_S
    while int(turn_file.read_text() or -1) < turn:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{turn_file}: turn {turn} did not come within {_TURN_TIMEOUT_S:.0f} s")
        time.sleep(_TURN_POLL_S)


def pass_turn(turn_file: Path | None, turn: int) -> None:
    if turn_file is not None:
        tmp = turn_file.with_name(turn_file.name + ".tmp")
        tmp.write_text(str(turn + 1))
        os.replace(tmp, turn_file)


def read_split(features: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` float32 ``[n, d]`` (row-major: batches gather rows) and ``y`` int64 class indices."""
    df = pd.read_parquet(features / f"{name}.parquet")
    x = np.array(df.drop(columns="target").to_numpy(dtype=np.float32), order="C")  # a writable copy
    return torch.from_numpy(x), torch.from_numpy(df["target"].to_numpy(dtype=np.int64))


def mlp(input_dim: int, hidden: list[int], n_outputs: int) -> nn.Module:
    layers: list[nn.Module] = []
    width = input_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, n_outputs))


def sha256_of(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in module.state_dict().values():
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--checkpoint-dir", type=Path, required=True)
    parser.add_argument("--timings", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--turn-file", type=Path, help="take turns with another job, epoch by epoch (benchmark)")
    parser.add_argument("--turn-slot", type=int, default=1, help="0: this job's epoch 1 goes first")
    parser.add_argument("--hidden", type=lambda s: [int(h) for h in s.split(",")], default=[64, 32])
    args = parser.parse_args()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")

    x, y = read_split(args.features, "train")
    n_classes = int(json.loads((args.features / "feature_spec.json").read_text())["n_classes"])
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    module = mlp(x.shape[1], args.hidden, n_classes)
    torch.manual_seed(args.seed + 1 + rank)
    model = DistributedDataParallel(module)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    bs = args.batch_size
    per_rank = math.ceil(len(x) / world_size)
    n_steps = math.ceil(per_rank / bs)
    if rank == 0:
        args.checkpoint_dir.mkdir(parents=True, exist_ok=True)

    steps_s, log_s, checkpoint_s, epoch_s = [], [], [], []
    for epoch in range(1, args.epochs + 1):
        turn = 2 * (epoch - 1) + (epoch - 1 + args.turn_slot) % 2
        take_turn(args.turn_file, turn)
        start = time.perf_counter()
        order = shard(len(x), world_size, rank, args.seed, epoch)
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
        dist.all_reduce(totals)
        log_start = save_start = time.perf_counter()
        if rank == 0:
            log.info("epoch %d/%d loss %.4f %.0f samples/s", epoch, args.epochs, (totals[0] / totals[1]).item(),
                     per_rank * world_size / (steps_end - start))
            save_start = time.perf_counter()
            torch.save({"epoch": epoch, "model": module.state_dict(), "optimizer": optimizer.state_dict()},
                       args.checkpoint_dir / f"epoch_{epoch:04d}.pt")
        end = time.perf_counter()
        if rank == 0:
            pass_turn(args.turn_file, turn)
        steps_s.append(steps_end - start)
        log_s.append(save_start - log_start)
        checkpoint_s.append(end - save_start)
        epoch_s.append(end - start)

    take_turn(args.turn_file, 2 * args.epochs)
    if rank == 0:
        args.timings.write_text(json.dumps({"steps_s": steps_s, "log_s": log_s, "checkpoint_s": checkpoint_s,
                                            "epoch_s": epoch_s, "samples_per_epoch": per_rank * world_size,
                                            "sha256": sha256_of(module)}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
