"""The training loop: data-parallel training of a :mod:`kiln.tasks.training.networks` network with PyTorch DDP.

One entrypoint, ``python -m kiln.tasks.training --config cfg.json``, runs unchanged under torchrun (any number of
processes), inside a container, and as a single process on a laptop CPU; :func:`run_train` is the same code for
tests and notebooks. Rank 0 checkpoints every epoch; a restarted job resumes after the newest checkpoint whose
fingerprint matches its config and data, so a retried task continues where the last try died, with the same
final weights as an uninterrupted run.
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
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, TensorDataset

from kiln.tasks.features.splits import load_split
from kiln.tasks.features.transform import FEATURE_SPEC_FILE
from kiln.tasks.parent_death import die_with_torchrun
from kiln.tasks.storage.artifacts import write_json
from kiln.tasks.training import checkpoints as checkpoint
from kiln.tasks.training import fence
from kiln.tasks.training.job import METRICS_FILE, TrainConfig, TrainJobResult
from kiln.tasks.training.mlflow_logging import MlflowLogger, run_params
from kiln.tasks.training.networks import MODEL_FILE, build_model, save_model

log = logging.getLogger(__name__)

_EVAL_BATCH = 4096


@dataclass(frozen=True)
class _DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launched: bool
    """Started by torchrun (or another launcher that sets the rank variables)."""


def _dist_env() -> _DistEnv:
    """torchrun's rank variables: the only environment this module reads (settings holds all the rest)."""
    env = os.environ
    if "RANK" not in env:
        return _DistEnv(0, 1, 0, launched=False)
    return _DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), launched=True)


@dataclass
class _Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    input_dim: int
    n_outputs: int


def _read_split(features_dir: Path, split: Literal["train", "val"], task: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_split(features_dir, split)
    # Row-major, because batches gather rows (a DataFrame's matrix is column-major).
    features, labels = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    return features, (labels if task == "classification" else labels.unsqueeze(1))


def _load_data(config: TrainConfig) -> _Data:
    """The train and val splits as tensors, checked against the feature spec.

    Raises:
        ValueError: the folder's task or columns disagree with the config, or labels are out of range.
    """
    folder = Path(config.features_dir)
    spec = json.loads((folder / FEATURE_SPEC_FILE).read_text())
    if spec.get("task", config.task) != config.task:
        raise ValueError(f"features in {folder} are for task {spec['task']!r}, but TrainConfig.task is "
                         f"{config.task!r}")
    input_dim, n_classes = int(spec["input_dim"]), int(spec.get("n_classes") or 0)
    if config.task == "classification" and n_classes < 2:
        raise ValueError(f"{folder / FEATURE_SPEC_FILE}: classification needs n_classes >= 2, found {n_classes}")
    x_train, y_train = _read_split(folder, "train", config.task)
    x_val, y_val = _read_split(folder, "val", config.task)
    if len(x_train) == 0:
        raise ValueError(f"{folder / 'train.parquet'} has no rows")
    if config.task == "classification":
        for name, y in (("train", y_train), ("val", y_val)):
            bad = y[(y < 0) | (y >= n_classes)]
            if len(bad):
                raise ValueError(f"{folder / name}.parquet: target values {sorted(set(bad.tolist()))[:5]} are "
                                 f"outside the class indices 0..{n_classes - 1}")
    return _Data(x_train, y_train, x_val, y_val, input_dim, n_classes if config.task == "classification" else 1)


# Collectives that degrade to local no-ops when there is no process group (a plain in-process run).
def _broadcast(obj: Any) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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


def param_checksum(module: nn.Module) -> dict[str, Any]:
    """Checksums of a module's state: float64 sum and sha256 of the raw bytes, in state-dict order.

    Two replicas are bit-identical exactly when their ``sha256`` values are equal.
    """
    digest, total = hashlib.sha256(), 0.0
    for tensor in module.state_dict().values():
        t = tensor.detach().cpu().contiguous()
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        total += float(t.double().sum())
    return {"sha256": digest.hexdigest(), "sum": total}


@dataclass
class _State:
    """Training progress that a checkpoint carries."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None


def _setup_device(env: _DistEnv, config: TrainConfig) -> torch.device:
    torch.set_num_threads(config.training.threads_per_proc)
    cuda = torch.cuda.is_available()
    if cuda and env.local_rank >= torch.cuda.device_count():
        raise ValueError(f"rank {env.rank} is local rank {env.local_rank} but this node shows only "
                         f"{torch.cuda.device_count()} GPU(s): lease one GPU per rank (training.resources.gpus = "
                         "training.nproc), or hide the GPUs (CUDA_VISIBLE_DEVICES='') to train on CPU")
    device = torch.device(f"cuda:{env.local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if env.launched and not dist.is_initialized():
        # Bounded so that a hung (not dead) peer makes the survivors fail instead of waiting forever; a dead
        # peer is handled sooner by torchrun, which stops the whole group.
        timeout = timedelta(seconds=min(config.training.timeout_s, 300))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return device


def _device_facts(device: torch.device) -> dict[str, Any]:
    """Where the job ran, for ``train_metrics.json``: the device (and GPU model), how many GPUs the lease let the
    rank see, the DDP backend and the AMP dtype."""
    cuda = device.type == "cuda"
    return {"device": device.type, "device_name": torch.cuda.get_device_name(device) if cuda else None,
            "visible_gpus": torch.cuda.device_count(), "backend": dist.get_backend() if dist.is_initialized() else None,
            "amp": "bf16" if cuda else None}


def run_train(config: TrainConfig) -> TrainJobResult:
    """Train (or resume training) and write ``model.pt`` + ``train_metrics.json`` from rank 0.

    Runs as one process when no torchrun rank variables are set, else as one DDP rank (creating and destroying the
    process group). Seeded: the same config and data give bit-identical weights, resumed or not.

    Raises:
        ValueError: features that do not fit the config; any error from a rank (peers are then stopped by torchrun).
    """
    env = _dist_env()
    owns_group = env.launched and not dist.is_initialized()
    device = _setup_device(env, config)
    result = _train(config, env, device)
    if owns_group:
        # Not in a finally: after an error a peer may be blocked in a collective, and the process is exiting.
        dist.barrier()
        dist.destroy_process_group()
    return result


def _train(config: TrainConfig, env: _DistEnv, device: torch.device) -> TrainJobResult:
    t, is_main, distributed = config.training, env.rank == 0, dist.is_initialized()
    data = _load_data(config)
    fingerprint = config.fingerprint()
    ckpt_dir = Path(config.checkpoint_dir)
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)  # fail fast on an unusable folder, not after epoch 1
    ckpt = _broadcast(checkpoint.find_checkpoint(ckpt_dir, fingerprint, t.epochs) if is_main else None)

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    module = build_model(config.model, data.input_dim, data.n_outputs).to(device)
    state = _State()
    if ckpt is not None:
        module.load_state_dict(ckpt["model_state"])
        state = _State(ckpt["epoch"], list(ckpt["history"]), resumed_from=ckpt["epoch"])
        if is_main:
            log.info("resuming from checkpoint epoch %d (%s)", state.epoch, ckpt_dir / f"epoch_{state.epoch:04d}.pt")
    model: nn.Module = module
    if distributed:
        model = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    opt_cls = torch.optim.Adam if t.optimizer == "adam" else torch.optim.SGD
    optimizer = opt_cls(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer_state"])
    # Each rank has its own RNG stream (dropout masks differ by rank); a checkpoint holds every rank's state so that
    # a resumed run draws exactly what an uninterrupted one would have.
    if ckpt is not None and len(ckpt["rng_states"]) == env.world_size:
        checkpoint.set_rng_state(ckpt["rng_states"][env.rank], device)
    else:
        if ckpt is not None:
            log.warning("checkpoint from %d ranks, now %d: RNG streams restart", len(ckpt["rng_states"]),
                        env.world_size)
        torch.manual_seed(t.seed + 1 + env.rank + state.epoch * 1009)

    x, y = data.x_train.to(device), data.y_train.to(device)
    x_val, y_val = data.x_val.to(device), data.y_val.to(device)
    loss_fn: nn.Module = nn.CrossEntropyLoss() if config.task == "classification" else nn.MSELoss()
    sampler: DistributedSampler[Any] = DistributedSampler(TensorDataset(x), num_replicas=env.world_size,
                                                          rank=env.rank, shuffle=True, seed=t.seed)
    n_steps = math.ceil(sampler.num_samples / t.batch_size)
    # bf16 autocast on CUDA only (not exercised by the CPU test suite); CPU trains in float32.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    bs, log_every = t.batch_size, t.log_every_steps
    mlflow = MlflowLogger(config, enabled=is_main)
    if is_main:
        log.info("training %s %s: %d params, %d train / %d val rows, world_size %d, batch %d per rank, epochs %d-%d "
                 "on %s", config.task, config.model.type, sum(p.numel() for p in module.parameters()), len(x),
                 len(x_val), env.world_size, t.batch_size, state.epoch + 1, t.epochs,
                 " ".join(f"{k}={v}" for k, v in _device_facts(device).items() if v is not None))
        if state.resumed_from is None:
            with fence.holding(ckpt_dir, config.fence_token):
                mlflow.log_params(run_params(config, env.world_size, fingerprint))

    loop_s, loop_samples = 0.0, 0
    for epoch in range(state.epoch + 1, t.epochs + 1):
        start = last_log = time.perf_counter()
        sampler.set_epoch(epoch)
        # np.fromiter: 4x faster than torch.tensor(list(...)), which would cost ~2% of a small model's epoch.
        order = torch.from_numpy(np.fromiter(sampler, np.int64, sampler.num_samples)).to(device)
        losses: list[torch.Tensor] = []
        for step in range(n_steps):
            idx = order[step * bs:(step + 1) * bs]
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())  # no .item() per step: it would force a device sync
            if is_main and (step + 1) % log_every == 0:
                now = time.perf_counter()
                window = torch.stack(losses[-log_every:]).float().mean().item()
                log.info("epoch %d/%d step %d/%d loss %.4f lr %.1e %.0f ms/step", epoch, t.epochs, step + 1,
                         n_steps, window, optimizer.param_groups[0]["lr"], (now - last_log) * 1000 / log_every)
                last_log = now
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_s = time.perf_counter() - start
        # Sample-weighted mean loss over all ranks (the last batch may be short).
        sizes = torch.full((n_steps,), float(bs), dtype=torch.float64, device=device)
        sizes[-1] = sampler.num_samples - (n_steps - 1) * bs
        totals = torch.stack([(torch.stack(losses).double() * sizes).sum(), sizes.sum()])
        if distributed:
            dist.all_reduce(totals)
        rng_states = _gather(checkpoint.rng_state(device))
        global_samples = sampler.num_samples * env.world_size
        loop_s, loop_samples = loop_s + epoch_s, loop_samples + global_samples
        state.epoch = epoch
        if is_main:
            metrics = {"train/loss": (totals[0] / totals[1]).item(), "train/samples_per_s": global_samples / epoch_s,
                       **_evaluate(module, x_val, y_val, config.task)}
            state.history.append({"epoch": epoch, **metrics})
            log.info("epoch %d/%d done in %.1f s: %s", epoch, t.epochs, epoch_s,
                     " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            # A job of an earlier try (its task was killed) stops here instead of writing into the retry's state.
            with fence.holding(ckpt_dir, config.fence_token):
                mlflow.log_metrics(metrics, step=epoch)
                checkpoint.save_checkpoint(ckpt_dir, {
                    "epoch": epoch, "fingerprint": fingerprint, "model_state": module.state_dict(),
                    "optimizer_state": optimizer.state_dict(), "rng_states": rng_states, "history": state.history,
                    "world_size": env.world_size, "config": config.to_json(), "fence_token": config.fence_token})

    checksums = _gather(param_checksum(module))
    samples_per_s = loop_samples / loop_s if loop_s > 0 else None
    history = _broadcast(state.history)
    final = {k: v for k, v in (history[-1] if history else {}).items() if k != "epoch"}
    out = Path(config.output_dir)
    if is_main:
        meta = {"train_config": config.to_json(), "fingerprint": fingerprint, "epochs_run": state.epoch,
                "resumed_from_epoch": state.resumed_from, "world_size": env.world_size}
        with fence.holding(ckpt_dir, config.fence_token):
            save_model(out / MODEL_FILE, module, model_spec=config.model, input_dim=data.input_dim,
                       n_outputs=data.n_outputs, task=config.task, extra=meta)
            write_json(out / METRICS_FILE, {
                "history": history, "final": final, "samples_per_s": samples_per_s, "world_size": env.world_size,
                **_device_facts(device),
                "epochs_run": state.epoch, "resumed_from_epoch": state.resumed_from, "param_checksums": checksums,
                "fingerprint": fingerprint})
        log.info("wrote %s and %s (params in sync across %d ranks: %s)", out / MODEL_FILE, out / METRICS_FILE,
                 env.world_size, len({c["sha256"] for c in checksums}) == 1)
    return TrainJobResult(epochs_run=state.epoch, resumed_from_epoch=state.resumed_from, metrics=final,
                       samples_per_s=samples_per_s, model_file=str(out / MODEL_FILE), world_size=env.world_size)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m kiln.tasks.training --config cfg.json``; exits 0 on success, 1 on any error."""
    parser = argparse.ArgumentParser(prog="python -m kiln.tasks.training", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="TrainConfig JSON file")
    args = parser.parse_args(argv)
    # torchrun starts each rank in a session of its own: were torchrun killed, a rank would train on alone.
    die_with_torchrun()
    rank = _dist_env().rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(message)s")
    code = 0
    try:
        run_train(TrainConfig.from_json(args.config.read_text()))
    except BaseException:
        log.exception("training failed on rank %d", rank)  # the traceback, tagged with the rank
        code = 1
    # torch 2.13 CPU with gloo sometimes aborts during interpreter teardown after destroy_process_group
    # ("terminate called without an active exception", SIGABRT), and the peer's torchrun then hangs. Skipping
    # teardown with os._exit avoids it; flush first because os._exit does not.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
