"""Training checkpoints: one atomic file per epoch, found again by a fingerprint of the config and data.

A checkpoint is only resumed from when it was written by the same model, optimizer settings, seed and features
(``TrainConfig.fingerprint``); anything else (another config, a truncated or foreign file) is skipped with a
warning naming it, and training falls back to an older checkpoint or a fresh start.
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Any

import torch

from kiln.tasks.storage.artifacts import atomic_write_bytes

log = logging.getLogger(__name__)

#: Checkpoints kept per job (older ones are deleted after each new one is written).
CHECKPOINT_KEEP = 2
CHECKPOINT_RE = re.compile(r"^epoch_(\d{4,})\.pt$")


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the checkpoint files in ``folder``, newest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found, reverse=True)


def find_checkpoint(folder: Path, fingerprint: str, max_epoch: int) -> dict[str, Any] | None:
    """The newest loadable checkpoint written by the same config and data, at most ``max_epoch``."""
    for epoch, path in list_checkpoints(folder):
        if epoch > max_epoch:
            log.warning("skipping checkpoint %s: epoch %d is beyond the %d epochs asked for", path, epoch, max_epoch)
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            found_fp, found_epoch = ckpt["fingerprint"], ckpt["epoch"]
        except Exception as exc:  # any unreadable file: an older checkpoint, or a fresh start, is the fallback
            log.warning("skipping checkpoint %s: unreadable (%s: %s)", path, type(exc).__name__, exc)
            continue
        if found_fp != fingerprint or found_epoch != epoch:
            log.warning("skipping checkpoint %s: written for another config or data (fingerprint %s, this run %s)",
                        path, str(found_fp)[:12], fingerprint[:12])
            continue
        return ckpt
    return None


def save_checkpoint(folder: Path, payload: dict[str, Any]) -> Path:
    """Write ``epoch_{k:04d}.pt`` atomically, then delete all but the newest ``CHECKPOINT_KEEP`` of this job."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    epoch = payload["epoch"]
    path = atomic_write_bytes(folder / f"epoch_{epoch:04d}.pt", buf.getvalue())
    keep = {epoch - i for i in range(CHECKPOINT_KEEP)}
    for old_epoch, old in list_checkpoints(folder):
        if old_epoch not in keep:
            old.unlink(missing_ok=True)
    return path


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict[str, torch.Tensor | None], device: torch.device) -> None:
    cpu, cuda = state["cpu"], state["cuda"]
    assert cpu is not None  # always saved; only the CUDA state is optional
    torch.set_rng_state(cpu)
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
