"""From what the user typed (a directory or hub id, a device, a dtype) to a DecoderStack and tokenizer."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from .blocks import DecoderStack
from .checkpoint import CheckpointReader, resolve_model_dir
from .errors import StreamPruneError
from .placement import Budget, apply_gpu_limit
from .state import RunManifest

log = logging.getLogger("streamprune")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def choose_device(name: str) -> torch.device:
    """'auto' is cuda when available, else cpu; asking for cuda without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise StreamPruneError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):  # torch knows mps, xpu, ...; streaming is built for these two
        raise StreamPruneError(f"device {name} is not supported; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StreamPruneError(f"device {name} was asked for but CUDA is not available here; use cpu")
    return device


def warn_beyond_context(seqlen: int, context: int | None) -> None:
    """Windows longer than the model's context still run, but the model was not trained on them."""
    if context and seqlen > context:
        log.warning("seqlen %d is above the model's context of %d tokens", seqlen, context)


def _declared_config(config_file: Path) -> dict:
    """config.json as written, or {} when it cannot be read."""
    try:
        declared = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return declared if isinstance(declared, dict) else {}


def load_config(model_dir: Path, trust_remote_code: bool = False):
    """transformers' config of a model directory; StreamPruneError when there is none (naming an
    unfinished streamprune run, whose config.json comes last) or transformers cannot read it."""
    if not (model_dir / "config.json").is_file():
        run = RunManifest.load(model_dir)
        if run is not None:
            why = f": {run.error}" if run.error else ""
            raise StreamPruneError(
                f"{model_dir} holds an unfinished streamprune run ({run.status}, {run.blocks_done} of "
                f"{run.blocks_total} blocks done{why}); rerun its prune command to finish it"
            )
        raise StreamPruneError(f"no config.json in {model_dir}; is it a Hugging Face model directory?")
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as exc:
        if "trust_remote_code" in str(exc):
            raise StreamPruneError(f"{model_dir} needs custom code to load; pass --trust-remote-code if you trust it") from exc
        declared_type = _declared_config(model_dir / "config.json").get("model_type")
        if isinstance(declared_type, str) and "does not recognize" in str(exc).replace("\n", " "):
            import transformers

            raise StreamPruneError(
                f"model type {declared_type!r} is unknown to transformers {transformers.__version__}; a newer "
                "transformers may know it (streamprune families lists the tested ones)"
            ) from exc
        raise StreamPruneError(f"cannot read {model_dir / 'config.json'}: {' '.join(str(exc).split())}") from exc


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False, options: dict | None = None):
    """The model's tokenizer, or None when the directory has none (token ids can still be given);
    `options` go to AutoTokenizer.from_pretrained (add_bos_token, as lm-eval's HFLM gives it)."""
    if not any(model_dir.glob("tokenizer*")):
        return None
    return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code, **(options or {}))


def stored_dtype(reader: CheckpointReader) -> torch.dtype:
    """The dtype of most of the checkpoint's floating-point values (its weights' dtype)."""
    counts: dict[torch.dtype, int] = {}
    for key, dtype in reader.dtypes.items():
        if dtype.is_floating_point:
            counts[dtype] = counts.get(dtype, 0) + torch.Size(reader.shapes[key]).numel()
    if not counts:
        raise StreamPruneError("the checkpoint holds no floating-point tensors")
    return max(counts, key=counts.get)


def compute_dtype(reader: CheckpointReader, requested: str, device: torch.device) -> torch.dtype:
    """'auto' computes in the checkpoint's own dtype (that of most of its values), except float16 on a
    CPU: float32 there.

    CPUs multiply float16 matrices about 100 times slower than float32 (measured: under 3 against 180
    GFLOP/s on the development machine), and float32 holds every float16 value exactly.
    """
    if requested != "auto":
        if requested not in DTYPES:
            raise StreamPruneError(f"unknown dtype {requested!r}; use auto, {', '.join(DTYPES)}")
        return DTYPES[requested]
    stored = stored_dtype(reader)
    if stored not in DTYPES.values():
        raise StreamPruneError(f"checkpoint dtype {stored} cannot be computed in; pass --dtype float32 or bfloat16")
    if stored == torch.float16 and device.type == "cpu":
        return torch.float32
    return stored


@dataclass
class OpenedModel:
    model_dir: Path
    stack: DecoderStack
    tokenizer: object | None


def open_model(
    model: str | Path, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False, budget: Budget | None = None,
    tokenizer_options: dict | None = None,
) -> OpenedModel:
    """Config, lazy reader and block skeleton (where the blocks are is derived from the model); no
    weights are read yet.  tokenizer_options go to the tokenizer's from_pretrained (load_tokenizer)."""
    model_dir = resolve_model_dir(str(model))
    config = load_config(model_dir, trust_remote_code)
    reader = CheckpointReader(model_dir)
    device = choose_device(device)
    apply_gpu_limit(device, budget)
    dtype = compute_dtype(reader, dtype, device)
    stack = DecoderStack(config, reader, device, dtype, trust_remote_code, budget)
    if not stack.block_keys(0):
        raise StreamPruneError(f"no tensors under {stack.layout.block_prefix(0)} in {model_dir}")
    problems = stack.checkpoint_problems()
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise StreamPruneError(f"{model_dir} does not match its config.json: {problems[0]}{more}")
    return OpenedModel(model_dir, stack, load_tokenizer(model_dir, trust_remote_code, tokenizer_options))
