"""The run manifest `streamprune.json` (what was asked, what is done, what it cost) and resuming.

A run whose manifest is not `complete` is resumed by the same command: the options, the resolved
device and dtype and a fingerprint of the input must all be the same, the calibration token ids are
read back from the output, and pruning continues after the last block whose shard is in place.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import INDEX_FILE, check_writable, is_partial_file, shard_name, write_json
from .errors import StreamPruneError
from .placement import proc_bytes

log = logging.getLogger("streamprune")

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
    peak = proc_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def reset_peak_memory(device: torch.device) -> None:
    """Starts this process's peak figures afresh (VmHWM and the CUDA allocator's), so that each run a
    process makes (a sweep's prunings and evaluations) reports its own peak, not the largest so far."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS
    except OSError:  # not Linux, or not allowed: the peak stays the process's
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif torch.cuda.is_initialized():  # an earlier run of this process used the GPU
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)


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
    status: str = "running"  # running, interrupted, failed (see error), complete
    error: str | None = None  # why a failed run stopped
    blocks_done: int = 0
    device: str = "cpu"
    dtype: str = ""
    calibration_ids: str = CALIBRATION_IDS_FILE
    calibration: dict = field(default_factory=dict)  # windows, seqlen, tokens, distinct_tokens, text_tokens
    placement: str | None = None  # where the calibration hidden states lived: device, cpu or disk
    sparsity: dict = field(default_factory=dict)  # tensor name -> fraction of zeros as written
    budgets: dict | None = None  # with --budgets owl: outlier ratios and each block's sparsity (budgets.py)
    block_choices: dict = field(default_factory=dict)  # block index -> what a choosing method (en-auto) chose
    timings: dict = field(default_factory=lambda: {"calibration_s": 0.0, "blocks_s": [], "total_s": 0.0})
    peak_memory: dict = field(default_factory=dict)
    versions: dict = field(default_factory=versions)
    checked: bool = True  # false only for runs made with the private _STREAMPRUNE_UNCHECKED=1 (checks.py)
    input_fingerprint: str = ""
    resumed: int = 0  # how many times an unfinished run was continued
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    finished_at: str | None = None

    def save(self, out_dir: Path) -> None:
        write_json(Path(out_dir) / MANIFEST_FILE, asdict(self))

    @classmethod
    def load(cls, out_dir: Path) -> "RunManifest | None":
        path = Path(out_dir) / MANIFEST_FILE
        if not path.is_file():
            return None
        try:
            values = json.loads(path.read_text())
            names = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in values.items() if k in names})
        except (ValueError, TypeError) as exc:
            raise StreamPruneError(f"{path} is unreadable ({exc}); pass --overwrite to start over") from exc


FINGERPRINT_SAMPLES = 16  # pieces of each weight file in the fingerprint, evenly spaced, the first at 0
FINGERPRINT_SAMPLE_BYTES = 64 * 1024


def input_fingerprint(model_dir: Path) -> str:
    """sha256 of config.json, the index, and of every weight file its name, size and 16 pieces of 64 KiB
    spread over it (its header included): changes when the model does, also for another model of the
    same shape (a fine-tune of the same base has the same config, index and sizes).  Reads about 1 MiB
    per weight file."""
    digest = hashlib.sha256()
    model_dir = Path(model_dir)
    for name in ("config.json", INDEX_FILE):
        if (model_dir / name).is_file():
            digest.update((model_dir / name).read_bytes())
    for weights in sorted(model_dir.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size};".encode())
        with weights.open("rb") as handle:
            for sample in range(FINGERPRINT_SAMPLES):
                handle.seek(sample * max(0, size - FINGERPRINT_SAMPLE_BYTES) // (FINGERPRINT_SAMPLES - 1))
                digest.update(handle.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def first_difference(earlier: RunManifest, current: RunManifest) -> str | None:
    """What makes `current` another run than the unfinished `earlier` one, in words; None if nothing."""
    if earlier.input_fingerprint != current.input_fingerprint:
        return f"the model differs (the unfinished run pruned {earlier.model}, whose files were different)"
    for option, value in current.config.items():
        if earlier.config.get(option) != value:
            return f"{_flag(option)} was {earlier.config.get(option)!r} and is now {value!r}"
    for option in ("device", "dtype"):
        if getattr(earlier, option) != getattr(current, option):
            return f"the {option} was {getattr(earlier, option)} and is now {getattr(current, option)}"
    return None


# Libraries whose arithmetic makes the blocks' numbers: another version may change them by a bit.
BITWISE_LIBRARIES = ("torch", "transformers")


def version_difference(earlier: dict, current: dict) -> str | None:
    """A library of BITWISE_LIBRARIES whose version (manifest `versions`) changed, in words; None if none did."""
    for library in BITWISE_LIBRARIES:
        before, now = earlier.get(library), current.get(library)
        if before != now:
            return f"{library} was {before} when it started and is now {now}"
    return None


def blocks_in_place(out_dir: Path, manifest: RunManifest) -> int:
    """How many leading blocks have their shard written and readable (at most what the manifest says)."""
    from safetensors import SafetensorError, safe_open

    total = manifest.blocks_total + 1
    for index in range(manifest.blocks_done):
        try:
            with safe_open(Path(out_dir) / shard_name(index, total), framework="pt"):
                pass
        except (SafetensorError, OSError):
            return index
    return manifest.blocks_done


@dataclass
class Plan:
    """Where a run starts: afresh (the output is emptied), or resumed after `start_block` blocks."""

    manifest: RunManifest
    start_block: int = 0
    resumed: bool = False


def plan_run(out: Path, current: RunManifest, overwrite: bool, resume: bool) -> Plan:
    """Decides between a fresh run and resuming; refuses what would clobber or mix runs. Changes nothing.
    The output's place (a writable directory, not the input's nor around or inside it) was checked by
    the OutputLock taken before."""
    if not out.exists() or overwrite or all(_written_before_the_manifest(p.name) for p in out.iterdir()):
        return Plan(current)  # empty, or a run killed before its first manifest: nothing to keep
    earlier = RunManifest.load(out)
    if earlier is None:
        raise StreamPruneError(f"output directory {out} is not empty and was not made by streamprune; pass --overwrite to replace it")
    if earlier.status == "complete":
        raise StreamPruneError(f"output directory {out} already holds a complete run; pass --overwrite to redo it")
    if not resume:
        return Plan(current)
    difference = first_difference(earlier, current)
    if difference:
        raise StreamPruneError(
            f"output directory {out} holds an unfinished run with other options: {difference}; "
            "rerun with the same options to resume it, or pass --overwrite to start over"
        )
    upgraded = version_difference(earlier.versions, current.versions)
    if upgraded:
        raise StreamPruneError(
            f"output directory {out} holds an unfinished run, but {upgraded}: resumed, it would not be bitwise "
            "identical to an uninterrupted run; pass --no-resume or --overwrite to start over"
        )
    earlier.resumed += 1
    return Plan(earlier, start_block=blocks_in_place(out, earlier), resumed=True)


def _written_before_the_manifest(name: str) -> bool:
    """What a run writes before its first manifest: the calibration ids, or a temporary file."""
    return name == CALIBRATION_IDS_FILE or is_partial_file(name)


def make_output(out: Path) -> None:
    """An empty output directory (whatever was there is gone: plan_run allowed it).  The directory itself
    stays, emptied, so that the lock held on it (OutputLock) holds on."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for entry in out.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except OSError as exc:
        raise StreamPruneError(f"cannot write to output directory {out}: {exc.strerror}") from exc


class OutputLock:
    """An exclusive lock on a run's output directory while the run writes it: a second run into the same
    directory (the same command started twice) is refused instead of writing the same shards beside it.

    The lock is the operating system's advisory lock on the directory itself (fcntl.flock, Linux and
    macOS), released when the run ends or its process dies (SIGKILL too), so a killed run's directory is
    resumed as before.  Where the file system cannot lock a directory (NFS, Lustre without -o flock,
    SMB), a warning says so and the run goes on unlocked.  The directory is made if missing, with its
    missing parents, once the output's place is checked (a directory, writable, neither the input
    checkpoint nor around or inside it), and what this lock made is removed again, if still empty, when
    it is released: a run that failed before writing leaves no folders behind.  Raises StreamPruneError
    for an output in the wrong place and when another process holds it."""

    def __init__(self, out: Path, model_dir: Path):
        if out.exists() and not out.is_dir():
            raise StreamPruneError(f"output path {out} is a file; give a directory")
        resolved, source = out.resolve(), Path(model_dir).resolve()
        if resolved == source or resolved in source.parents or source in resolved.parents:
            raise StreamPruneError(f"output {out} would hold the input checkpoint, or lie inside it; choose another directory")
        check_writable(out, f"to output directory {out}")
        # the folders this lock makes, deepest first: the output and its missing parents
        self.out, self.made, self.handle = out, [folder for folder in (out, *out.parents) if not folder.exists()], None
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StreamPruneError(f"cannot write to output directory {out}: {exc.strerror}") from exc
        try:
            import fcntl
        except ImportError:  # no advisory locks on this system: runs are not kept apart
            return
        self.handle = os.open(out, os.O_RDONLY)
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.handle)
            self.handle = None
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # this file system locks no directory
                log.warning("cannot lock %s (%s): runs started into it meanwhile are not kept apart", out, exc.strerror)
                return
            self.release()  # what this lock made goes again
            raise StreamPruneError(f"another streamprune run is writing to {out} now; wait for it to end (a rerun "
                                   "then resumes or reports it), or choose another output directory") from None

    def release(self) -> None:
        """Releases the lock; removes the folders this lock made (the output, its parents) that are still
        empty."""
        if self.handle is not None:
            os.close(self.handle)
            self.handle = None
        for folder in self.made:
            try:
                folder.rmdir()  # only when empty: a run that wrote nothing leaves nothing
            except OSError:
                break  # not empty, so neither are its parents
        self.made = []

