"""The one orchestrator: checkpoint -> block -> statistics -> scores -> masks -> writer -> manifest.

For each decoder block: load it, run the calibration hidden states through it with statistics hooks,
prune every linear from those dense statistics, run the pruned block again so the next block sees
pruned outputs (as the reference Wanda code does; not after the last block), write the pruned tensors,
free the block.

Resuming (after a crash, SIGKILL, Ctrl-C or a full disk) replays the blocks already written: each is
read back from the output and run once over the calibration hidden states, which gives bitwise the
inputs the interrupted run had for the next block (same ids, batches, device and dtype).  The cost is
one forward pass per finished block, against two passes, statistics and a write to prune it.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .blocks import Activations, DecoderStack
from .calibration import calibration_windows, recorded_windows, save_windows
from .checkpoint import CheckpointReader, CheckpointWriter, remove_partial_files
from .config import PruneConfig, parse_pattern
from .errors import Interrupted, StreamPruneError
from .loading import open_model, warn_beyond_context
from .masking import n_m_mask, row_mask, zero_fraction
from .placement import Budget
from .scoring import WEIGHT_ONLY, ActivationNorms, feature_scale, scores
from .state import (
    CALIBRATION_IDS_FILE, RunManifest, input_fingerprint, make_output, peak_memory, plan_run, reset_peak_memory,
)
from .stats import input_statistics, linear_layers

log = logging.getLogger("streamprune")

ROW_CHUNK = 256  # rows scored and masked at once: bounds the memory of scores and selections


def keep_mask(weight: torch.Tensor, norms: ActivationNorms | None, config: PruneConfig) -> torch.Tensor:
    """The keep-mask of one linear layer's weight under the configured method and pattern."""
    scale = feature_scale(config.method, norms, config.alpha)
    keep = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    for start in range(0, weight.shape[0], ROW_CHUNK):
        chunk_scores = scores(weight[start : start + ROW_CHUNK], scale)
        if config.pattern:
            keep[start : start + ROW_CHUNK] = n_m_mask(chunk_scores, *parse_pattern(config.pattern))
        else:
            keep[start : start + ROW_CHUNK] = row_mask(chunk_scores, config.sparsity)
    return keep


def prune_block(
    stack: DecoderStack, index: int, acts: Activations | None, config: PruneConfig, stored: dict | None = None
) -> dict[str, torch.Tensor]:
    """Prunes block `index`, advances `acts` through it and frees it; returns its tensors as they are stored.

    `acts` is None for weight-only methods, which need no forward passes; `stored` is the block already
    read (by the background reader).  The returned tensors are in the checkpoint's dtype: cast back from
    the compute dtype where that is exact (float16 or bfloat16 computed in float32, or no conversion),
    else read again and masked, so kept weights never change.
    """
    block = stack.load_block(index, stored=stored)
    statistics = {}
    if acts is not None:
        with input_statistics(block) as statistics:
            stack.run_block(index, acts, config.batch_size, write_back=False)
    prefix = stack.family.block_prefix(index)
    inexact_masks = {}
    with torch.no_grad():
        for name, linear in linear_layers(block).items():
            norms = statistics[name].norms(config.stat_norm) if statistics else None
            keep = keep_mask(linear.weight, norms, config)
            linear.weight.masked_fill_(~keep, 0)
            if not stack.holds_exactly(f"{prefix}{name}.weight"):
                inexact_masks[f"{prefix}{name}.weight"] = keep.cpu()
    if acts is not None and index + 1 < stack.num_blocks:  # the last block's outputs feed nothing
        stack.run_block(index, acts, config.batch_size, write_back=True)
    pruned = stack.unload_block(index)
    for key in [k for k in pruned if not stack.holds_exactly(k)]:
        original = stack.reader.read([key])[key]
        if key in inexact_masks:
            original.masked_fill_(~inexact_masks[key], 0)
        pruned[key] = original
    return pruned


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


class _Background:
    """One background thread for I/O when overlapping pays (CUDA); otherwise jobs run at once, inline."""

    def __init__(self, enabled: bool):
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamprune-io") if enabled else None

    def submit(self, job, *args) -> Future:
        if self.pool is not None:
            return self.pool.submit(job, *args)
        future: Future = Future()
        try:
            future.set_result(job(*args))
        except BaseException as exc:  # handed to whoever waits on the future, as the pool would
            future.set_exception(exc)
        return future

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _prune_blocks(stack, acts, config, start_block, writer, manifest, record, progress, overlap) -> None:
    """Replays the blocks an earlier session wrote, then prunes and writes the rest, one at a time.

    With overlap, block i+1 is read from disk while block i computes, and block i is written while
    block i+1 computes; a block counts as done (in the manifest) only once its shard is in place.
    """
    reads, writes = _Background(overlap), _Background(overlap)
    read_ahead: dict[int, Future] = {}

    def read_soon(index: int) -> None:
        if overlap and index < stack.num_blocks:
            read_ahead[index] = reads.submit(stack.read_block, index)

    def finish(index: int, written: Future, pruned: dict, block_seconds: float) -> None:
        written.result()  # raises what the write raised (a full disk)
        for key, tensor in pruned.items():
            if tensor.ndim == 2 and key.endswith(".weight"):
                manifest.sparsity[key] = round(zero_fraction(tensor), 6)
        manifest.timings["blocks_s"].append(round(block_seconds, 3))
        record(blocks_done=index + 1)
        bar.update()
        if stop_asked() and index + 1 < stack.num_blocks:
            record(status="interrupted")
            raise Interrupted(
                f"stopped after block {index + 1} of {stack.num_blocks}; rerun the same command to resume where it stopped"
            )

    with stop_requests() as stop_asked, tqdm(total=stack.num_blocks, desc="Pruning blocks", unit="block", disable=not progress) as bar:
        if acts is not None and 0 < start_block < stack.num_blocks:  # with every block written, nothing to replay
            bar.set_description_str("Replaying written blocks")
            for index in range(start_block):
                replay_block(stack, index, acts, writer, config.batch_size)
                bar.update()
        else:
            bar.update(start_block)
        bar.set_description_str("Pruning blocks")
        pending = None
        read_soon(start_block)
        try:
            for index in range(start_block, stack.num_blocks):
                block_started = time.perf_counter()
                read_soon(index + 1)
                stored = read_ahead.pop(index).result() if index in read_ahead else None
                pruned = prune_block(stack, index, acts, config, stored)
                del stored
                if pending is not None:
                    finish(*pending)
                pending = (index, writes.submit(writer.write_shard, index, pruned), pruned, time.perf_counter() - block_started)
                del pruned  # held by `pending` until written, and no longer: a block must not linger
                if not overlap:
                    finish(*pending)
                    pending = None
            if pending is not None:
                finish(*pending)
        finally:
            reads.shutdown()
            writes.shutdown()


def prune(
    model: str | Path,
    output: str | Path,
    config: PruneConfig | None = None,
    *,
    overwrite: bool = False,
    resume: bool = True,
    trust_remote_code: bool = False,
    progress: bool = True,
    budget: Budget | None = None,
    overlap: bool | None = None,
    **options,
) -> RunManifest:
    """Prunes the checkpoint `model` (directory or hub id) into the directory `output`.

    Options are PruneConfig's fields (method, alpha, sparsity, pattern, calib, nsamples, seqlen, ...),
    given either as a PruneConfig or as keyword arguments.  An unfinished run in `output` with the same
    options is resumed (resume=False starts it over).  `budget` says where the calibration hidden states
    may live (placement.py); `overlap` reads and writes blocks in the background (default: on CUDA).
    Neither changes the result.  Returns the final run manifest.
    """
    config = config or PruneConfig(**options)
    started = time.perf_counter()
    out = Path(output).expanduser()
    budget = budget or Budget()
    if budget.offload_dir is None:
        budget = dataclasses.replace(budget, offload_dir=str(out))
    opened = open_model(model, config.device, config.dtype, trust_remote_code, budget)
    stack, device = opened.stack, opened.stack.device
    warn_beyond_context(config.seqlen, getattr(stack.config, "max_position_embeddings", None))
    _check_pattern_fits(stack, config)

    current = RunManifest(
        model=str(model), config=config.to_dict(), blocks_total=stack.num_blocks, device=str(device),
        dtype=str(stack.dtype).removeprefix("torch."), input_fingerprint=input_fingerprint(opened.model_dir),
    )
    plan = plan_run(out, opened.model_dir, current, overwrite, resume)
    manifest = plan.manifest
    if plan.resumed:
        remove_partial_files(out)
        input_ids = recorded_windows(out / manifest.calibration_ids, config.nwindows, config.seqlen)
        log.warning("resuming the unfinished run in %s after block %d of %d", out, plan.start_block, stack.num_blocks)
    else:
        input_ids = calibration_windows(config.calib, opened.tokenizer, config.nwindows, config.seqlen, config.seed, progress)
        make_output(out)
        save_windows(out / CALIBRATION_IDS_FILE, input_ids)
    earlier_seconds = manifest.timings["total_s"]
    manifest.status = "running"
    manifest.save(out)
    earlier_peaks = dict(manifest.peak_memory or {})  # of the sessions before a resume
    reset_peak_memory(device)

    def record(**changes) -> None:
        for name, value in changes.items():
            setattr(manifest, name, value)
        manifest.timings["total_s"] = round(earlier_seconds + time.perf_counter() - started, 3)
        peaks = peak_memory(device)
        manifest.peak_memory = {k: max(v, earlier_peaks.get(k, 0)) for k, v in peaks.items()}
        manifest.save(out)

    acts = None if config.method in WEIGHT_ONLY else stack.embed(input_ids, config.batch_size)
    manifest.placement = acts.placement if acts else None
    if not plan.resumed:
        manifest.timings["calibration_s"] = round(time.perf_counter() - started, 3)
    writer = CheckpointWriter(out, total_shards=stack.num_blocks + 1)
    try:
        overlap = device.type == "cuda" if overlap is None else overlap
        _prune_blocks(stack, acts, config, plan.start_block, writer, manifest, record, progress, overlap)
    finally:
        if acts is not None:
            acts.close()

    writer.write_shard(stack.num_blocks, stack.reader.read(stack.non_block_keys()))
    writer.copy_metadata(opened.model_dir)
    writer.write_index()
    record(status="complete", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return manifest
