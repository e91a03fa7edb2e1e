"""The run manifest `streamprune.json`: what was asked, what is done, what it cost."""

from __future__ import annotations

import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import write_json

MANIFEST_FILE = "streamprune.json"
CALIBRATION_IDS_FILE = "calibration_ids.safetensors"


def versions() -> dict:
    import safetensors
    import transformers

    from . import __version__

    return {
        "streamprune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    Linux's VmHWM belongs to the running program; getrusage's ru_maxrss survives exec, so a child
    started by a large parent would report the parent's size.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory of this process so far, and of the GPU allocator when on CUDA."""
    peak = {"host_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        peak["gpu_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        peak["gpu_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return peak


@dataclass
class RunManifest:
    model: str
    config: dict
    blocks_total: int
    status: str = "running"
    blocks_done: int = 0
    device: str = "cpu"
    dtype: str = ""
    calibration_ids: str = CALIBRATION_IDS_FILE
    sparsity: dict = field(default_factory=dict)  # tensor name -> fraction of zeros as written
    timings: dict = field(default_factory=lambda: {"calibration_s": 0.0, "blocks_s": [], "total_s": 0.0})
    peak_memory: dict = field(default_factory=dict)
    versions: dict = field(default_factory=versions)
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    finished_at: str | None = None

    def save(self, out_dir: Path) -> None:
        write_json(Path(out_dir) / MANIFEST_FILE, asdict(self))
