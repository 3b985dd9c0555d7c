"""One worker of a training job: set up the rank, run the loop (kiln's or the pipeline's) through the training
API, and on rank 0 check, save and export the model it hands back.

One entrypoint, ``python -m kiln.tasks.training --config cfg.json``, runs unchanged under torchrun (any number of
processes), inside a container, and as a single process on a laptop CPU; :func:`run_train` is the same code for
tests and notebooks. Rank 0 writes ``model.pt`` (state dict and metadata), ``model.pt2`` (the exported program that
evaluate, the bundle and serving load without the pipeline's code) and ``train_metrics.json``; a model that cannot
be exported fails the job, and nothing is written.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kiln.tasks.parent_death import die_with_torchrun
from kiln.tasks.storage.artifacts import write_json
from kiln.tasks.training import fence
from kiln.tasks.training.api import (
    API_VERSION,
    JobPreemptedError,
    TrainContext,
    TrainedModel,
    broadcast,
    gather,
    request_stop,
)
from kiln.tasks.training.job import METRICS_FILE, PREEMPTED_EXIT_CODE, TrainConfig, TrainJobResult
from kiln.tasks.training.networks import MODEL_FILE, save_model
from kiln.tasks.training.user_code import UserCodeError, check_output_shape, import_callable

log = logging.getLogger(__name__)

#: How the built-in loop is named where a user loop's ``training.entrypoint`` would be.
BUILTIN_LOOP = "kiln.tasks.training.loop:train"
#: Rows of the example input the output shape is checked on.
_CHECK_ROWS = 8


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


def resolve_loop(config: TrainConfig) -> Callable[[TrainContext], Any]:
    """The loop to run: ``training.entrypoint`` from the pipeline's code, or kiln's own.

    Raises:
        UserCodeError: the entrypoint does not import or is not callable.
    """
    if config.entrypoint is None:
        from kiln.tasks.training.loop import train

        return train
    return import_callable(config.entrypoint, config.code_dir, field="training.entrypoint")


def run_train(config: TrainConfig) -> TrainJobResult:
    """Run the job's loop on this rank; rank 0 writes ``model.pt``, ``model.pt2`` and ``train_metrics.json``.

    Runs as one process when no torchrun rank variables are set, else as one DDP rank (creating and destroying the
    process group). kiln's loop is seeded: the same config and data give bit-identical weights, resumed or not.

    Raises:
        ValueError: features that do not fit the config; any error from a rank (peers are then stopped by torchrun).
        UserCodeError: the pipeline's code cannot be imported, or its loop handed back no usable model.
        ModelExportError: the trained model cannot be exported with ``torch.export``.
    """
    env = _dist_env()
    owns_group = env.launched and not dist.is_initialized()
    device = _setup_device(env, config)
    loop = resolve_loop(config)
    ctx = TrainContext(config, rank=env.rank, world_size=env.world_size, local_rank=env.local_rank, device=device)
    if ctx.is_main:
        log.info("job: %s, model %s%s, world_size %d, %s", config.entrypoint or "kiln's loop", config.model.type,
                 f" ({config.model.factory})" if config.model.factory else "", env.world_size,
                 " ".join(f"{k}={v}" for k, v in _device_facts(device).items() if v is not None))
    returned = loop(ctx)
    result = _finish(config, ctx, returned)
    if owns_group:
        # Not in a finally: after an error a peer may be blocked in a collective, and the process is exiting.
        dist.barrier()
        dist.destroy_process_group()
    return result


def _trained_module(config: TrainConfig, ctx: TrainContext, returned: Any) -> nn.Module | None:
    """The module this rank's loop returned (unwrapped), or ``None``; rank 0 checks that it fits the task."""
    ref = config.entrypoint or BUILTIN_LOOP
    if not isinstance(returned, TrainedModel):
        if not ctx.is_main:
            return None  # only rank 0's model is exported
        raise UserCodeError("training.entrypoint", ref, f"the loop returned {type(returned).__name__} on rank 0, not "
                            "a TrainedModel; end it with `return TrainedModel(module, example_input)` (from "
                            "kiln.tasks.training.api), e.g. TrainedModel(model, x_train[:8])")
    module = returned.module.module if isinstance(returned.module, DistributedDataParallel) else returned.module
    if not isinstance(module, nn.Module):
        raise UserCodeError("training.entrypoint", ref, f"TrainedModel.module is a {type(module).__name__}, not a "
                            "torch.nn.Module; hand back the trained network")
    if ctx.is_main:
        example = returned.example_input
        if not isinstance(example, torch.Tensor) or example.ndim != 2 or example.shape[1] != ctx.input_dim \
                or len(example) == 0 or not example.is_floating_point():
            found = list(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
            raise UserCodeError("training.entrypoint", ref, f"TrainedModel.example_input must be float features "
                                f"[n, {ctx.input_dim}] with n >= 1, found {found}; pass a few training rows, e.g. "
                                "ctx.load_split('train')[0][:8]")
        check_output_shape(module, ctx.input_dim, ctx.n_outputs, field="training.entrypoint", ref=ref,
                           example=example[:_CHECK_ROWS].float())
    return module


def _finish(config: TrainConfig, ctx: TrainContext, returned: Any) -> TrainJobResult:
    """Collective: checksums from every rank; then rank 0 exports the model and writes the job's outputs."""
    from kiln.tasks.bundle.program import PROGRAM_FILE, export_program, save_program

    module = _trained_module(config, ctx, returned)
    checksums = gather(param_checksum(module) if module is not None else None)
    rec = ctx._record
    history: list[dict[str, float]] = broadcast(rec.history)
    final: dict[str, float] = {}
    for entry in history:  # each metric's last value (a loop may log some metrics less often than others)
        final.update({k: v for k, v in entry.items() if k != "epoch"})
    samples_per_s = returned.samples_per_s if isinstance(returned, TrainedModel) else None
    samples_per_s = broadcast(samples_per_s)
    out, fingerprint = Path(config.output_dir), ctx._fingerprint
    if ctx.is_main:
        assert module is not None and isinstance(returned, TrainedModel)  # checked by _trained_module on rank 0
        if ctx._started_before and not rec.load_called:
            log.warning("the loop never called ctx.load_checkpoint: this try started over from the beginning although "
                        "an earlier one ran; call it at the start of the loop to resume")
        source = (f"model.factory '{config.model.factory}'" if config.model.type == "custom" else
                  f"model.type '{config.model.type}'") + (f" trained by training.entrypoint '{config.entrypoint}'"
                                                          if config.entrypoint else "")
        identity = {"entrypoint": config.entrypoint, "factory": config.model.factory, "code_hash": config.code_hash,
                    "api_version": API_VERSION,
                    # networks.load_model rebuilds only kiln's own networks trained by kiln's loop.
                    "rebuildable": config.entrypoint is None and config.model.type != "custom"}
        meta = {"train_config": config.to_json(), "fingerprint": fingerprint, "epochs_run": rec.last_epoch,
                "resumed_from_epoch": rec.resumed_from, "world_size": ctx.world_size, **identity}
        # clone(): the example is usually a view of the training data, and saving a view saves its whole storage
        # (a 4 GB model file and 3x that in memory with 10 M rows).
        program = export_program(module, returned.example_input.detach().cpu()[:_CHECK_ROWS].clone(), config.task,
                                 source=source)
        with fence.holding(ctx.checkpoint_dir, config.fence_token):
            save_model(out / MODEL_FILE, module, model_spec=config.model, input_dim=ctx.input_dim,
                       n_outputs=ctx.n_outputs, task=config.task, extra=meta)
            save_program(program, out / PROGRAM_FILE, {
                "task": config.task, "input_dim": ctx.input_dim, "n_outputs": ctx.n_outputs, "classes": ctx.classes,
                "model_spec": config.model.model_dump(mode="json"), "fingerprint": fingerprint, **identity})
            write_json(out / METRICS_FILE, {
                "history": history, "final": final, "samples_per_s": samples_per_s, "world_size": ctx.world_size,
                **_device_facts(ctx.device),
                "epochs_run": rec.last_epoch, "resumed_from_epoch": rec.resumed_from, "param_checksums": checksums,
                "fingerprint": fingerprint, "entrypoint": config.entrypoint, "api_version": API_VERSION})
        in_sync = len({c["sha256"] for c in checksums if c is not None}) == 1
        log.info("wrote %s, %s and %s (params in sync across %d ranks: %s)", out / MODEL_FILE, out / PROGRAM_FILE,
                 out / METRICS_FILE, ctx.world_size, in_sync)
    return TrainJobResult(epochs_run=rec.last_epoch, resumed_from_epoch=rec.resumed_from, metrics=final,
                          samples_per_s=samples_per_s, model_file=str(out / MODEL_FILE), world_size=ctx.world_size)


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m kiln.tasks.training --config cfg.json``; exits 0 on success, 1 on any error, and
    :data:`~kiln.tasks.training.job.PREEMPTED_EXIT_CODE` when it was asked to stop (SIGTERM) and saved a checkpoint
    for that at the loop's next ``save_checkpoint``."""
    parser = argparse.ArgumentParser(prog="python -m kiln.tasks.training", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="TrainConfig JSON file")
    args = parser.parse_args(argv)
    # A preemption's SIGTERM asks for a checkpoint first; the launcher kills a rank that takes longer than the grace.
    signal.signal(signal.SIGTERM, request_stop)
    # torchrun starts each rank in a session of its own: were torchrun killed, a rank would train on alone.
    die_with_torchrun()
    rank = _dist_env().rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(message)s")
    code = 0
    try:
        run_train(TrainConfig.from_json(args.config.read_text()))
    except JobPreemptedError as stop:
        log.info("preempted: checkpoint of epoch %d saved; exiting with %d", stop.epoch, PREEMPTED_EXIT_CODE)
        code = PREEMPTED_EXIT_CODE
    except BaseException:
        log.exception("training failed on rank %d", rank)  # the traceback, tagged with the rank
        code = 1
    # torch 2.13 CPU with gloo sometimes aborts during interpreter teardown after destroy_process_group
    # ("terminate called without an active exception", SIGABRT), and the peer's torchrun then hangs. Skipping
    # teardown with os._exit avoids it; flush first because os._exit does not.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
