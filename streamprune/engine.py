"""The one orchestrator: checkpoint -> block -> statistics -> scores -> masks -> writer -> manifest.

For each decoder block: load it, run the calibration hidden states through it with statistics hooks,
prune every linear from those dense statistics, run the pruned block again so the next block sees
pruned outputs (as the reference Wanda code does), write the pruned tensors, free the block.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .blocks import Activations, DecoderStack
from .calibration import calibration_windows
from .checkpoint import CheckpointWriter, write_atomic
from .config import PruneConfig, parse_pattern
from .errors import StreamPruneError
from .loading import open_model
from .manifest import CALIBRATION_IDS_FILE, MANIFEST_FILE, RunManifest, peak_memory
from .masking import n_m_mask, row_mask
from .scoring import WEIGHT_ONLY, ActivationNorms, feature_scale, scores
from .stats import input_statistics, linear_layers

log = logging.getLogger("streamprune")


def check_output(output: str | Path, model_dir: Path, overwrite: bool) -> Path:
    """Refuses an output that is a file, holds the input, or is not empty (unless overwrite); changes nothing."""
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise StreamPruneError(f"output path {out} is a file; give a directory")
    resolved, source = out.resolve(), model_dir.resolve()
    if resolved == source or resolved in source.parents:
        raise StreamPruneError(f"output {out} would hold the input checkpoint; choose another directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        made_by_us = (out / MANIFEST_FILE).exists()
        what = "holds an earlier streamprune run" if made_by_us else "is not empty and was not made by streamprune"
        raise StreamPruneError(f"output directory {out} {what}; pass --overwrite to replace it")
    return out


def make_output(out: Path) -> None:
    """An empty, writable output directory (whatever was there is gone: check_output allowed it)."""
    try:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
    except OSError as exc:
        raise StreamPruneError(f"cannot write to output directory {out}: {exc.strerror}") from exc


def keep_mask(weight: torch.Tensor, norms: ActivationNorms | None, config: PruneConfig) -> torch.Tensor:
    """The keep-mask of one linear layer's weight under the configured method and pattern."""
    layer_scores = scores(weight, feature_scale(config.method, norms, config.alpha))
    if config.pattern:
        return n_m_mask(layer_scores, *parse_pattern(config.pattern))
    return row_mask(layer_scores, config.sparsity)


def prune_block(stack: DecoderStack, index: int, acts: Activations | None, config: PruneConfig) -> dict[str, torch.Tensor]:
    """Prunes block `index` in place and advances `acts` through it; returns its pruned tensors as stored.

    `acts` is None for weight-only methods, which need no forward passes.
    """
    block, stored = stack.load_block(index)
    statistics = {}
    if acts is not None:
        with input_statistics(block) as statistics:
            stack.run_block(index, acts, config.batch_size, write_back=False)
    prefix = stack.family.block_prefix(index)
    with torch.no_grad():
        for name, linear in linear_layers(block).items():
            norms = statistics[name].norms(config.stat_norm) if statistics else None
            keep = keep_mask(linear.weight, norms, config)
            linear.weight.masked_fill_(~keep, 0)
            stored[f"{prefix}{name}.weight"].masked_fill_(~keep.cpu(), 0)
    if acts is not None:
        stack.run_block(index, acts, config.batch_size, write_back=True)
    return stored


def _check_pattern_fits(stack: DecoderStack, config: PruneConfig) -> None:
    if not config.pattern:
        return
    _, m = parse_pattern(config.pattern)
    for key in stack.block_keys(0):
        shape = stack.reader.shapes[key]
        if key.endswith(".weight") and len(shape) == 2 and shape[1] % m:
            raise StreamPruneError(f"pattern {config.pattern}: {key} has {shape[1]} inputs, not divisible by {m}")


def prune(
    model: str | Path,
    output: str | Path,
    config: PruneConfig | None = None,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    **options,
) -> RunManifest:
    """Prunes the checkpoint `model` (directory or hub id) into the directory `output`.

    Options are PruneConfig's fields (method, alpha, sparsity, pattern, calib, nsamples, seqlen, ...),
    given either as a PruneConfig or as keyword arguments.  Returns the final run manifest.
    """
    config = config or PruneConfig(**options)
    started = time.perf_counter()
    opened = open_model(model, config.device, config.dtype, trust_remote_code)
    stack, device = opened.stack, opened.stack.device
    out = check_output(output, opened.model_dir, overwrite)
    max_positions = getattr(stack.config, "max_position_embeddings", None)
    if max_positions and config.seqlen > max_positions:
        log.warning("seqlen %d is above the model's context of %d tokens", config.seqlen, max_positions)
    _check_pattern_fits(stack, config)

    input_ids = calibration_windows(config.calib, opened.tokenizer, config.nwindows, config.seqlen, config.seed, progress)
    make_output(out)
    write_atomic(out / CALIBRATION_IDS_FILE, lambda tmp: save_file({"input_ids": input_ids}, tmp, metadata={"format": "pt"}))

    manifest = RunManifest(
        model=str(model), config=config.to_dict(), blocks_total=stack.num_blocks, device=str(device),
        dtype=str(stack.dtype).removeprefix("torch."),
    )
    manifest.save(out)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    acts = None if config.method in WEIGHT_ONLY else stack.embed(input_ids, config.batch_size)
    manifest.timings["calibration_s"] = round(time.perf_counter() - started, 3)
    writer = CheckpointWriter(out, total_shards=stack.num_blocks + 1)
    bar = tqdm(range(stack.num_blocks), desc="Pruning blocks", unit="block", disable=not progress)
    for index in bar:
        block_started = time.perf_counter()
        pruned = prune_block(stack, index, acts, config)
        writer.write_shard(index, pruned)
        stack.free_block(index)
        for key, tensor in pruned.items():
            if tensor.ndim == 2 and key.endswith(".weight"):
                manifest.sparsity[key] = round((tensor == 0).sum().item() / tensor.numel(), 6)
        manifest.blocks_done = index + 1
        manifest.timings["blocks_s"].append(round(time.perf_counter() - block_started, 3))
        manifest.peak_memory = peak_memory(device)
        manifest.save(out)
    bar.close()
    del acts

    writer.write_shard(stack.num_blocks, stack.reader.read(stack.non_block_keys()))
    writer.copy_metadata(opened.model_dir)
    writer.write_index()
    manifest.status = "complete"
    manifest.timings["total_s"] = round(time.perf_counter() - started, 3)
    manifest.peak_memory = peak_memory(device)
    manifest.finished_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest.save(out)
    return manifest
