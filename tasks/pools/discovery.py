"""What this machine lends: its CPU cores, memory and GPUs (``nvidia-smi``, or NVML through pynvml)."""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.tasks.pools.allocation import PoolError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuDevice:
    """One GPU of a node."""

    id: str
    """What the driver accepts in ``CUDA_VISIBLE_DEVICES``: ``GPU-<uuid>`` when known, else the index."""
    index: int
    """nvidia-smi index (PCI bus order)."""
    uuid: str | None
    memory: int
    """Bytes of device memory."""
    model: str = ""


def discover_cpus() -> tuple[int, ...]:
    """The core ids this process may run on (its affinity mask, which honours cgroup cpusets)."""
    return tuple(sorted(os.sched_getaffinity(0)))


def discover_memory(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemTotal in bytes."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise PoolError(f"no MemTotal line in {meminfo}")


def discover_gpus() -> tuple[GpuDevice, ...]:
    """GPUs from ``nvidia-smi`` (or NVML through pynvml when only that is present); none when neither exists."""
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=index,uuid,memory.total,name", "--format=csv,noheader,nounits"],
                             check=True, capture_output=True, text=True, timeout=30).stdout
        return parse_nvidia_smi(out)
    try:
        import pynvml
    except ImportError:
        return ()
    return _nvml_gpus(pynvml)


def parse_nvidia_smi(text: str) -> tuple[GpuDevice, ...]:
    """Parse ``index, uuid, memory.total [MiB], name`` lines (nvidia-smi csv,noheader,nounits)."""
    gpus = []
    for row in csv.reader(io.StringIO(text), skipinitialspace=True):
        if not row:
            continue
        index, uuid, mem_mib, name = (c.strip() for c in row[:4])
        gpus.append(GpuDevice(id=uuid or index, index=int(index), uuid=uuid or None,
                              memory=int(float(mem_mib)) * 1024**2, model=name))
    return tuple(sorted(gpus, key=lambda g: g.index))


def _nvml_gpus(pynvml: Any) -> tuple[GpuDevice, ...]:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # pynvml installed on a machine without a driver: no GPUs, not an error
        logger.info("NVML unavailable (%s): no GPUs discovered", exc)
        return ()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            gpus.append(GpuDevice(id=uuid, index=i, uuid=uuid, memory=int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                                  model=name))
        return tuple(gpus)
    finally:
        pynvml.nvmlShutdown()
