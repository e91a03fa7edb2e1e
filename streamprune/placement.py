"""Where the hidden states of the calibration windows live between blocks.

  device  a tensor on the device the blocks run on (fastest; GPU memory holds them all)
  cpu     host memory (pinned when the blocks run on CUDA and the pinned allocation, rounded up to a power
          of two by PyTorch, fits --max-cpu-memory), one batch at a time copied to the device
  disk    a file, read and written one batch at a time with plain file I/O (no memory map: resident
          memory stays one batch, whatever the size of the file)

`auto` takes the first that fits: the device if the states plus a reserve for the block and its
activations fit in --max-gpu-memory (default: 90% of the free GPU memory), else host memory if they
fit in --max-cpu-memory (default: 80% of the available host memory), else disk.  On a CPU the device
is host memory, so the choice is between it and disk.

On CUDA, --max-gpu-memory is also a cap on what PyTorch's caching allocator may reserve
(`torch.cuda.set_per_process_memory_fraction`): where cached, fragmented blocks would take the process
past it, the allocator frees its cache and retries, and only an allocation that truly does not fit fails.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import StreamPruneError

PLACEMENTS = ("auto", "device", "cpu", "disk")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """'3GiB', '800MB', '1.5G', 1000 -> bytes; None stays None."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise StreamPruneError(f"cannot read the size {text!r}; write it like 3GiB, 800MB or 1.5G")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def proc_bytes(path: str, field: str) -> int | None:
    """A `Field:  N kB` line of a Linux /proc file, in bytes; None where there is no such file or line."""
    try:
        with open(path, encoding="ascii") as lines:
            for line in lines:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_host_bytes() -> int:
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass(frozen=True)
class Budget:
    """What the user allows: a placement (or auto) and memory limits in bytes (None: what is free)."""

    offload: str = "auto"
    max_gpu_bytes: int | None = None
    max_cpu_bytes: int | None = None
    offload_dir: str | None = None  # where `disk` puts its file (default: the system's temporary folder)

    def __post_init__(self):
        if self.offload not in PLACEMENTS:
            raise StreamPruneError(f"--offload must be one of {', '.join(PLACEMENTS)}, got {self.offload!r}")


def apply_gpu_limit(device: torch.device, budget: Budget | None) -> None:
    """Caps the memory PyTorch's caching allocator may reserve on `device` at budget.max_gpu_bytes
    (torch.cuda.set_per_process_memory_fraction; the CUDA context itself is outside it).  Measured on an
    H200 (LLaMA-2-7B shape, SparseGPT under a 4 GiB budget): 3.0 GiB allocated at the peak but 5.0 GiB
    reserved without the cap.  Nothing is done on a CPU or without a limit."""
    if device.type != "cuda" or budget is None or budget.max_gpu_bytes is None:
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget.max_gpu_bytes / total), index)


def host_limit_bytes(budget: Budget) -> int:
    """The host memory the budget allows, in bytes: --max-cpu-memory, else 80% of what is available now."""
    return budget.max_cpu_bytes if budget.max_cpu_bytes is not None else int(0.8 * available_host_bytes())


def pinned_bytes(nbytes: int) -> int:
    """The host memory, in bytes, that PyTorch's caching host allocator takes for a pinned tensor of `nbytes`
    bytes (tensor.pin_memory(), torch.empty(..., pin_memory=True)): the next power of two (torch 2.13,
    ATen/core/CachingHostAllocator.h: every request is rounded up so, below `pinned_max_round_threshold_mb`
    of PYTORCH_ALLOC_CONF, unlimited by default), kept by the allocator for reuse after the tensor is
    freed.  1.5 GiB of hidden states take 2 GiB pinned."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 1 else nbytes


def choose_placement(nbytes: int, reserve_bytes: int, device: torch.device, budget: Budget, host_reserve_bytes: int = 0) -> str:
    """The placement for `nbytes` of hidden states, leaving `reserve_bytes` for a block at work on the
    device, and on CUDA `host_reserve_bytes` of host memory beside them in host memory (the pinned copies
    of the blocks read from the checkpoint, StreamingStack.host_reserve_bytes)."""
    if budget.offload != "auto":
        if budget.offload == "cpu" and device.type == "cpu":
            return "device"
        return budget.offload
    host = host_limit_bytes(budget)
    if device.type == "cuda":
        gpu = budget.max_gpu_bytes
        if gpu is None:
            free, _ = torch.cuda.mem_get_info(device)
            gpu = int(0.9 * free)
        if nbytes + reserve_bytes <= gpu:
            return "device"
        return "cpu" if nbytes + host_reserve_bytes <= host else "disk"
    return "device" if nbytes + reserve_bytes <= host else "disk"


def pin_host_states(sizes: list[int], budget: Budget, host_reserve_bytes: int = 0) -> bool:
    """Whether hidden states placed in host memory for a CUDA device ("cpu"), tensors of `sizes` bytes
    resident at once, are pinned: when their pinned allocations (pinned_bytes, each up to twice its size)
    fit the host limit (host_limit_bytes) beside `host_reserve_bytes`.  Otherwise they are ordinary
    (pageable) memory of their exact sizes, which the limit then holds, at the cost of copies to and from
    the device that wait for each other."""
    return sum(pinned_bytes(n) for n in sizes) + host_reserve_bytes <= host_limit_bytes(budget)


class TensorStates:
    """Hidden states in one tensor on the device or in host memory, pinned there for a CUDA device unless
    `pin` is False (pin_host_states)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, storage: torch.device, compute: torch.device, pin: bool = True):
        pin = pin and storage.type == "cpu" and compute.type == "cuda"
        self.tensor = torch.empty(shape, dtype=dtype, device=storage, pin_memory=pin)
        self.compute = compute
        self.shape = shape

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop].to(self.compute, non_blocking=True)

    def write(self, start: int, values: torch.Tensor) -> None:
        self.tensor[start : start + values.shape[0]].copy_(values)

    def close(self) -> None:
        self.tensor = None


class FileStates:
    """Hidden states in a file, rows read and written with pread/pwrite-style I/O, one batch at a time."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, directory: Path, compute: torch.device):
        self.shape, self.dtype, self.compute = shape, dtype, compute
        self.row_bytes = dtype.itemsize
        for size in shape[1:]:
            self.row_bytes *= size
        handle, name = tempfile.mkstemp(prefix=".hidden-states-", suffix=".tmp", dir=directory)
        os.close(handle)
        self.path = Path(name)
        try:
            os.truncate(self.path, self.row_bytes * shape[0])
        except OSError as exc:
            self.path.unlink(missing_ok=True)
            raise StreamPruneError(f"cannot make the hidden-state file in {directory}: {exc.strerror}") from exc
        self.file = open(self.path, "r+b", buffering=0)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop on the compute device. Raises StreamPruneError when the file is shorter."""
        buffer = bytearray(self.row_bytes * (stop - start))
        view = memoryview(buffer)
        self.file.seek(start * self.row_bytes)
        while view:  # one read(2) moves at most 2 GiB - 4 KiB on Linux; a batch of 7B rows is more
            count = self.file.readinto(view)
            if not count:
                raise StreamPruneError(f"the hidden-state file {self.path} ended early; was it truncated?")
            view = view[count:]
        rows = torch.frombuffer(buffer, dtype=self.dtype).view(stop - start, *self.shape[1:])
        return rows.to(self.compute)

    def write(self, start: int, values: torch.Tensor) -> None:
        """Writes `values` (rows, *shape[1:]) from row `start`. Raises StreamPruneError when it cannot."""
        data = values.detach().to("cpu").contiguous().view(torch.uint8)
        view = memoryview(data.numpy()).cast("B")  # bytes: a short write is counted in bytes, not rows
        self.file.seek(start * self.row_bytes)
        try:
            while view:  # as in read: the unbuffered file writes what one write(2) takes
                view = view[self.file.write(view) :]
        except OSError as exc:
            raise StreamPruneError(f"cannot write the hidden states to {self.path}: {exc.strerror}") from exc

    def close(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def make_states(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, placement: str, directory: str | Path | None,
    pin: bool = True,
) -> TensorStates | FileStates:
    """Storage for hidden states of `shape` and `dtype` where `placement` says: a tensor on `device`, one
    in host memory ("cpu"; pinned for a CUDA device when `pin`), or a file in `directory` ("disk")."""
    if placement == "disk":
        return FileStates(shape, dtype, Path(directory or tempfile.gettempdir()), device)
    storage = device if placement == "device" else torch.device("cpu")
    return TensorStates(shape, dtype, storage, device, pin=pin)
