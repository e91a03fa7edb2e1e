"""Safetensors checkpoints, one block at a time.

The reader maps tensor names to files (from the index, or the single `model.safetensors`) and reads only
what is asked for.  The writer puts each block in its own shard, named `model-0000i-of-0000N` from the
start because N (blocks + one shard for everything else) is known in advance; every file goes to a
temporary name first and is renamed into place, and the index is written last, so a directory without
its index is never mistaken for a finished checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections import deque
from fnmatch import fnmatch
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checks import stored_magnitude
from .errors import StreamPruneError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Everything a Hugging Face model directory needs besides its weights.
METADATA_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template.*",
    "*.jinja",
    "preprocessor_config.json",  # multimodal checkpoints (Gemma 3): the image side is copied as it is
    "processor_config.json",
)

_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def resolve_model_dir(model: str) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (safetensors and metadata only)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise StreamPruneError(f"model path {model} is a file; give the model's directory")
        return path
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise StreamPruneError(f"model directory {model} does not exist")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(model, allow_patterns=["*.safetensors", "*.safetensors.index.json", *METADATA_PATTERNS])
    except Exception as exc:  # offline, unknown repo, gated model: all say the same to the user
        raise StreamPruneError(
            f"{model} is not a local directory, and could not be downloaded from the Hugging Face hub as a "
            f"model id ({type(exc).__name__}); check the path, or the id and your connection"
        ) from exc
    return Path(local)


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint (single file or sharded with an index)."""

    def __init__(self, model_dir: Path, files: list[str] | None = None):
        """Reads the index or model.safetensors of model_dir; or, given `files`, exactly those shards."""
        self.model_dir = Path(model_dir)
        self.weight_map = self._weight_map() if files is None else self._files_map(files)
        self.magnitudes: dict[str, float] = {}  # largest |value| of each float tensor checked so far
        self._check_headers()

    def _files_map(self, files: list[str]) -> dict[str, str]:
        weight_map = {}
        for filename in files:
            with self._open(filename) as handle:
                weight_map.update({key: filename for key in handle.keys()})
        return weight_map

    def _weight_map(self) -> dict[str, str]:
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise StreamPruneError(f"{index} is not a valid safetensors index ({exc})") from exc
            missing = sorted({f for f in weight_map.values() if not (self.model_dir / f).is_file()})
            if missing:
                raise StreamPruneError(f"shard {missing[0]} named in {INDEX_FILE} is missing from {self.model_dir}")
            return dict(weight_map)
        single = self.model_dir / SINGLE_FILE
        if single.is_file():
            with self._open(SINGLE_FILE) as handle:
                return {key: SINGLE_FILE for key in handle.keys()}
        if any((self.model_dir / name).exists() for name in PICKLE_WEIGHTS):
            raise StreamPruneError(
                f"{self.model_dir} has only pickle (.bin) weights; streamprune reads safetensors only. "
                "Convert them first (load with transformers and save_pretrained(safe_serialization=True))"
            )
        raise StreamPruneError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.model_dir}")

    def _open(self, filename: str):
        try:
            return safe_open(self.model_dir / filename, framework="pt", device="cpu")
        except (SafetensorError, OSError) as exc:
            raise StreamPruneError(f"{self.model_dir / filename} is not a readable safetensors file ({exc})") from exc

    def _check_headers(self) -> None:
        """Every file named by the map opens and holds the tensors the map says it holds."""
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for filename in sorted(set(self.weight_map.values())):
            with self._open(filename) as handle:
                present = set(handle.keys())
                for key in (k for k, f in self.weight_map.items() if f == filename):
                    if key not in present:
                        raise StreamPruneError(f"tensor {key} is not in {filename} although the index says so")
                    tensor_slice = handle.get_slice(key)
                    self.shapes[key] = tuple(tensor_slice.get_shape())
                    self.dtypes[key] = _TORCH_DTYPES[tensor_slice.get_dtype()]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def keys_with_prefix(self, prefix: str) -> list[str]:
        """Names under a module prefix; the prefix ends with '.', so 'layers.1.' never matches 'layers.10.'."""
        assert prefix.endswith(".")
        return [key for key in self.weight_map if key.startswith(prefix)]

    def iter_tensors(self, keys: list[str]):
        """(name, tensor) one at a time, on the CPU in the checkpoint's dtype.

        The file is opened for each tensor: pages of a memory map stay resident while it is open, so a
        handle kept across a block would hold the whole block in memory a second time.  Raises
        StreamPruneError for a truncated file or a tensor holding NaN or infinity (checked the first
        time it is read; its largest magnitude is kept in `magnitudes`).
        """
        for key in keys:
            filename = self.weight_map[key]
            try:
                with self._open(filename) as handle:
                    tensor = handle.get_tensor(key)
            except SafetensorError as exc:
                raise StreamPruneError(f"{self.model_dir / filename} is truncated or corrupt ({exc})") from exc
            if key not in self.magnitudes:
                magnitude = stored_magnitude(key, tensor, self.model_dir / filename)
                if magnitude is not None:
                    self.magnitudes[key] = magnitude
            yield key, tensor
            del tensor  # not held while the next one is read

    def check_tensors(self, keys: list[str]) -> None:
        """Reads the named tensors one at a time, only to check them (iter_tensors), keeping none."""
        deque(self.iter_tensors(keys), maxlen=0)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors on the CPU, in the checkpoint's dtype."""
        return dict(self.iter_tensors(keys))


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # safetensors creates 0600 files; outputs should read like any other file


def write_atomic(path: Path, write) -> None:
    """write(tmp_path), then rename into place: a reader sees the old file, or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:  # safetensors reports its own I/O errors as SafetensorError
        tmp.unlink(missing_ok=True)
        disk_full = getattr(exc, "errno", None) == errno.ENOSPC or any(
            sign in str(exc) for sign in ("StorageFull", "code: 28", "os error 28", "No space left")
        )
        if disk_full:
            raise StreamPruneError(
                f"no space left on the device while writing {path}; free some space and rerun the same command"
            ) from exc
        raise StreamPruneError(f"cannot write {path}: {getattr(exc, 'strerror', None) or exc}") from exc


PARTIAL_FILES = ".*.tmp"  # write_atomic's temporary names (and the disk placement's hidden-state file)


def is_partial_file(name: str) -> bool:
    return Path(name).match(PARTIAL_FILES)


def remove_partial_files(directory: Path) -> None:
    """Temporary files a killed run left behind (never renamed into place, so never part of the output)."""
    for tmp in Path(directory).glob(PARTIAL_FILES):
        tmp.unlink(missing_ok=True)


def check_writable(directory: Path, what: str) -> None:
    """Fails, naming `what`, where files could not be written into `directory` (made first if missing)."""
    existing = next(p for p in (directory, *directory.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise StreamPruneError(f"cannot write {what}: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise StreamPruneError(f"cannot write {what}: {existing} is not writable")


def write_json(path: Path, payload: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n"))


class CheckpointWriter:
    """Writes shard i of N as soon as it is ready; the index (naming them all) comes last."""

    def __init__(self, out_dir: Path, total_shards: int):
        self.out_dir = Path(out_dir)
        self.total_shards = total_shards

    def shard_path(self, index: int) -> Path:
        return self.out_dir / shard_name(index, self.total_shards)

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
        write_atomic(self.shard_path(index), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

    def copy_metadata(self, model_dir: Path) -> None:
        """config.json, generation config and tokenizer files, unchanged."""
        for source in sorted(Path(model_dir).iterdir()):
            if source.is_file() and any(fnmatch(source.name, pattern) for pattern in METADATA_PATTERNS):
                write_atomic(self.out_dir / source.name, lambda tmp, source=source: shutil.copyfile(source, tmp))

    def write_index(self) -> None:
        """The index of every shard's tensors, read back from the shards themselves."""
        weight_map, total_size = {}, 0
        for index in range(self.total_shards):
            name = shard_name(index, self.total_shards)
            with safe_open(self.out_dir / name, framework="pt") as handle:
                for key in handle.keys():
                    weight_map[key] = name
                    tensor_slice = handle.get_slice(key)
                    numel = 1
                    for dim in tensor_slice.get_shape():
                        numel *= dim
                    total_size += numel * _TORCH_DTYPES[tensor_slice.get_dtype()].itemsize
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(self.out_dir / INDEX_FILE, index)
