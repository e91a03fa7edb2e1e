"""The one orchestrator: checkpoint -> block -> statistics -> scores -> masks -> writer -> manifest.

For each decoder block: load it, run the calibration hidden states through it with statistics hooks,
prune every linear from those dense statistics, run the pruned block again so the next block sees
pruned outputs (as the reference Wanda code does), write the pruned tensors, free the block.

Resuming (after a crash, SIGKILL, Ctrl-C or a full disk) replays the blocks already written: each is
read back from the output and run once over the calibration hidden states, which gives bitwise the
inputs the interrupted run had for the next block (same ids, batches, device and dtype).  The cost is
one forward pass per finished block, against two passes, statistics and a write to prune it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .blocks import Activations, DecoderStack
from .calibration import calibration_windows
from .checkpoint import CheckpointReader, CheckpointWriter, remove_partial_files, write_atomic
from .config import PruneConfig, parse_pattern
from .errors import Interrupted, StreamPruneError
from .loading import open_model
from .masking import n_m_mask, row_mask
from .scoring import WEIGHT_ONLY, ActivationNorms, feature_scale, scores
from .state import CALIBRATION_IDS_FILE, RunManifest, input_fingerprint, make_output, peak_memory, plan_run
from .stats import input_statistics, linear_layers

log = logging.getLogger("streamprune")


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


def replay_block(stack: DecoderStack, index: int, acts: Activations, writer: CheckpointWriter, batch_size: int) -> None:
    """Advances `acts` through block `index` as already pruned and written by an earlier session."""
    shard = CheckpointReader(writer.out_dir, files=[writer.shard_path(index).name])
    stack.load_block(index, reader=shard)
    stack.run_block(index, acts, batch_size, write_back=True)
    stack.free_block(index)


def _check_pattern_fits(stack: DecoderStack, config: PruneConfig) -> None:
    if not config.pattern:
        return
    _, m = parse_pattern(config.pattern)
    for key in stack.block_keys(0):
        shape = stack.reader.shapes[key]
        if key.endswith(".weight") and len(shape) == 2 and shape[1] % m:
            raise StreamPruneError(f"pattern {config.pattern}: {key} has {shape[1]} inputs, not divisible by {m}")


@contextmanager
def stop_requests():
    """Ctrl-C (SIGINT) or SIGTERM ask the loop to stop at its next safe point; a second Ctrl-C stops at once."""
    asked = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def ask(signum, frame):
        if asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        asked.append(signum)
        log.warning("stopping after the block in progress is written (Ctrl-C again to stop at once)")

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(asked)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def prune(
    model: str | Path,
    output: str | Path,
    config: PruneConfig | None = None,
    *,
    overwrite: bool = False,
    resume: bool = True,
    trust_remote_code: bool = False,
    progress: bool = True,
    **options,
) -> RunManifest:
    """Prunes the checkpoint `model` (directory or hub id) into the directory `output`.

    Options are PruneConfig's fields (method, alpha, sparsity, pattern, calib, nsamples, seqlen, ...),
    given either as a PruneConfig or as keyword arguments.  An unfinished run in `output` with the same
    options is resumed (resume=False starts it over).  Returns the final run manifest.
    """
    config = config or PruneConfig(**options)
    started = time.perf_counter()
    opened = open_model(model, config.device, config.dtype, trust_remote_code)
    stack, device = opened.stack, opened.stack.device
    max_positions = getattr(stack.config, "max_position_embeddings", None)
    if max_positions and config.seqlen > max_positions:
        log.warning("seqlen %d is above the model's context of %d tokens", config.seqlen, max_positions)
    _check_pattern_fits(stack, config)

    out = Path(output).expanduser()
    current = RunManifest(
        model=str(model), config=config.to_dict(), blocks_total=stack.num_blocks, device=str(device),
        dtype=str(stack.dtype).removeprefix("torch."), input_fingerprint=input_fingerprint(opened.model_dir),
    )
    plan = plan_run(out, opened.model_dir, current, overwrite, resume)
    manifest = plan.manifest
    if plan.resumed:
        remove_partial_files(out)
        with safe_open(out / manifest.calibration_ids, framework="pt") as handle:
            input_ids = handle.get_tensor("input_ids")
        log.warning("resuming the unfinished run in %s after block %d of %d", out, plan.start_block, stack.num_blocks)
    else:
        input_ids = calibration_windows(config.calib, opened.tokenizer, config.nwindows, config.seqlen, config.seed, progress)
        make_output(out)
        write_atomic(out / CALIBRATION_IDS_FILE, lambda tmp: save_file({"input_ids": input_ids}, tmp, metadata={"format": "pt"}))
    earlier_seconds = manifest.timings["total_s"]
    manifest.status = "running"
    manifest.save(out)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def record(**changes) -> None:
        for name, value in changes.items():
            setattr(manifest, name, value)
        manifest.timings["total_s"] = round(earlier_seconds + time.perf_counter() - started, 3)
        manifest.peak_memory = peak_memory(device)
        manifest.save(out)

    acts = None if config.method in WEIGHT_ONLY else stack.embed(input_ids, config.batch_size)
    if not plan.resumed:
        manifest.timings["calibration_s"] = round(time.perf_counter() - started, 3)
    writer = CheckpointWriter(out, total_shards=stack.num_blocks + 1)
    with stop_requests() as stop_asked:
        bar = tqdm(total=stack.num_blocks, desc="Pruning blocks", unit="block", disable=not progress)
        if acts is not None:
            for index in range(plan.start_block):
                bar.set_description_str("Replaying written blocks")
                replay_block(stack, index, acts, writer, config.batch_size)
                bar.update()
        else:
            bar.update(plan.start_block)
        bar.set_description_str("Pruning blocks")
        for index in range(plan.start_block, stack.num_blocks):
            block_started = time.perf_counter()
            pruned = prune_block(stack, index, acts, config)
            writer.write_shard(index, pruned)
            stack.free_block(index)
            for key, tensor in pruned.items():
                if tensor.ndim == 2 and key.endswith(".weight"):
                    manifest.sparsity[key] = round((tensor == 0).sum().item() / tensor.numel(), 6)
            manifest.timings["blocks_s"].append(round(time.perf_counter() - block_started, 3))
            record(blocks_done=index + 1)
            bar.update()
            if stop_asked() and index + 1 < stack.num_blocks:
                record(status="interrupted")
                raise Interrupted(
                    f"stopped after block {index + 1} of {stack.num_blocks}; "
                    "rerun the same command to resume where it stopped"
                )
        bar.close()
    del acts

    writer.write_shard(stack.num_blocks, stack.reader.read(stack.non_block_keys()))
    writer.copy_metadata(opened.model_dir)
    writer.write_index()
    record(status="complete", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return manifest
