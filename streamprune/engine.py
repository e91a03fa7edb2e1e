"""The one orchestrator: checkpoint -> block -> statistics -> decision -> writer -> manifest.

The blocks are visited in order by the one block walker (walker.py, also used to replay and to
evaluate).  Each block goes through six phases: collect (the statistics the method needs, from one pass
of the dense block over the calibration hidden states, with hooks), reduce (across processes; one today),
decide and apply (the method decides each linear's mask, and new weights if it updates them; the layer
is changed in place), propagate (the pruned block runs again, so the next block sees pruned outputs, as
the reference Wanda and SparseGPT code do; not after the last block) and export (the tensors as they are
to be stored); then each pruned tensor is checked against its promise and the block is written.

Nothing wrong is marked complete (checks.py): tensors that are not finite are refused as they are
read, activations that overflow the compute dtype stop the run at their block, scores reach the
selection finite, and a pruned tensor that misses its sparsity is never written.  A run that stops on
an error records `failed` and the reason in its manifest; rerunning it resumes after the last block
written.

With --budgets owl a first pass over every block, the dense blocks propagating the hidden states,
gives each block its sparsity (budgets.py); the budgets are saved before the pruning pass starts, so a
resumed run uses them and never repeats the first pass once it is over.

Resuming (after a crash, SIGKILL, Ctrl-C or a full disk) replays the blocks already written: each is
read back from the output and run once over the calibration hidden states, which gives bitwise the
inputs the interrupted run had for the next block (same ids, batches, device and dtype).  The cost is
one forward pass per finished block, against two passes, statistics and a write to prune it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from . import checks
from . import progress as progress_bars
from .budgets import BUDGETS_FILE, load_budgets, outlier_ratio, owl_sparsities, save_budgets
from .blocks import Activations, DecoderStack
from .calibration import CalibrationSet, calibration_windows, recorded_windows, save_windows
from .checkpoint import CheckpointReader, CheckpointWriter, remove_partial_files, resolve_model_dir
from .config import PruneConfig, parse_pattern
from .errors import Interrupted, NumericalError, StreamPruneError, one_line, rerun_hint
from .loading import open_model, warn_beyond_context
from .masking import verify_sparsity, zero_fraction
from .methods import BlockView, Decision, Groups, get_method
from .obs import obs_prune
from .placement import Budget
from .state import (
    CALIBRATION_IDS_FILE, OutputLock, RunManifest, input_fingerprint, make_output, peak_memory, plan_run, reset_peak_memory,
)
from .stats import InputStatistics, input_statistics, linear_layers
from .walker import BlockWalker

log = logging.getLogger("streamprune")


def _hidden_states_finite(acts: Activations, batch_size: int) -> bool:
    rows = acts.hidden.shape[0]
    return all(
        checks.all_finite(acts.hidden.read(start, min(start + batch_size, rows))) for start in range(0, rows, batch_size)
    )


def check_statistics(
    stack: DecoderStack, index: int, acts: Activations, statistics: dict[str, InputStatistics], batch_size: int
) -> None:
    """Stops the run where the activations of block `index` overflowed the compute dtype.

    A NaN or infinity in a linear's inputs makes its float64 sums non-finite, so looking at the sums
    costs nothing.  Where they are not finite, the message names the first linear (in call order) whose
    inputs overflowed, or says that the hidden states entering the block already had (then the previous
    block's output overflowed).  Finite inputs whose squares pass float32's range (above about 1e19,
    possible in bfloat16 and float32) are told apart by their finite absolute sums.  Raises
    NumericalError; the blocks already written stay resumable.
    """
    if not checks.ENABLED:
        return
    broken = sorted((stat.first_call, name) for name, stat in statistics.items() if not stat.finite())
    if not broken:
        return
    dtype = str(stack.dtype).removeprefix("torch.")
    advice = f"rerun with {checks.wider_dtypes(stack.dtype)} and --overwrite"
    if not _hidden_states_finite(acts, batch_size):
        source = "the embeddings" if index == 0 else f"the output of block {index - 1}"
        raise NumericalError(f"the hidden states entering block {index} ({source}) overflowed {dtype}; {advice}")
    name = broken[0][1]
    stat = statistics[name]
    if not bool(torch.isfinite(stat.sq_sum).all()) and bool(torch.isfinite(stat.abs_sum).all()):
        raise NumericalError(
            f"the squares of the inputs of {name} in block {index} overflowed float32 (inputs above about 1e19); "
            "rerun with --dtype float64 and --overwrite"
        )
    raise NumericalError(f"the activations overflowed {dtype} in block {index} ({name} input); {advice}")


def verified_sparsity(key: str, tensor: torch.Tensor, sparsity: float, groups: Groups) -> float:
    """The share of zeros of a pruned weight about to be written, after its post-condition: finite, and
    every comparison group of its method as sparse as asked (masking.verify_sparsity).  Raises
    NumericalError naming the tensor otherwise."""
    if not checks.ENABLED:
        return zero_fraction(tensor)
    if not checks.all_finite(tensor):
        raise NumericalError(f"{key} would be written with {checks.nonfinite_summary(tensor)}; nothing was written")
    fraction, problem = verify_sparsity(tensor, sparsity, groups)
    if problem:
        raise NumericalError(f"{key} is not pruned as asked: {problem}; the block was not written")
    return fraction


# The block step, in phases: collect -> reduce -> decide -> apply -> propagate -> export.


def collect(
    stack: DecoderStack, index: int, block, acts: Activations | None, config: PruneConfig, needs: frozenset | None = None
) -> dict[str, InputStatistics]:
    """Phase 1: the statistics the run needs (`needs`, by default config.statistics) of every linear's
    inputs, from one pass of the dense block over the calibration hidden states (none, and no pass, when
    none are needed).  Raises NumericalError where the activations overflowed (check_statistics)."""
    needs = config.statistics if needs is None else needs
    if acts is None or not needs:
        return {}
    with input_statistics(block, needs) as statistics:
        stack.run_block(index, acts, config.batch_size, write_back=False)
    check_statistics(stack, index, acts, statistics, config.batch_size)
    return statistics


def reduce(statistics: dict[str, InputStatistics]) -> dict[str, InputStatistics]:
    """Phase 2: the statistics combined across processes.  One process holds all the calibration windows
    today, so they are returned as they are; with several, each process's sums and Gram matrices (over
    its share of the windows) are added up here, and every process then decides the same."""
    return statistics


def decide_and_apply(
    stack: DecoderStack, index: int, block, statistics: dict[str, InputStatistics], config: PruneConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Groups]]:
    """Phases 3 and 4, one linear at a time (so that one decision is held at once): the method decides
    (and --reconstruct updates the kept weights with the mask held), then the block's weight is masked or
    replaced by the updated one, so that the pruned pass sees the pruned layer.

    Returns the updated weights in the checkpoint's dtype on the CPU, the keep-masks of masked weights
    the compute dtype cannot hand back exactly (export reads those again), and each weight's comparison
    groups for its post-condition.
    """
    method = get_method(config.method)
    prefix = stack.layout.block_prefix(index)
    options = config.option_values
    updated, inexact_masks, groups = {}, {}, {}
    with torch.no_grad():
        for name, linear in linear_layers(block).items():
            key = f"{prefix}{name}.weight"
            decision = method.decide(linear.weight, statistics.get(name), config, key)
            if config.reconstruct:
                new, _ = obs_prune(linear.weight, statistics[name].gram, keep=decision.keep,
                                   blocksize=options["blocksize"], percdamp=options["percdamp"])
                decision = Decision(decision.keep, new)
            groups[key] = method.groups(config, linear.in_features)
            if decision.weight is not None:
                linear.weight.copy_(decision.weight)
                updated[key] = decision.weight.to(device="cpu", dtype=stack.reader.dtypes[key])
            else:
                linear.weight.masked_fill_(~decision.keep, 0)
                if not stack.holds_exactly(key):
                    inexact_masks[key] = decision.keep.cpu()
            del decision
    return updated, inexact_masks, groups


def propagate(stack: DecoderStack, index: int, acts: Activations | None, config: PruneConfig) -> None:
    """Phase 5: the pruned block's outputs replace the hidden states, as the next block's inputs (as the
    reference Wanda and SparseGPT code do); not after the last block, whose outputs feed nothing."""
    if acts is not None and index + 1 < stack.num_blocks:
        stack.run_block(index, acts, config.batch_size, write_back=True)


def export(stack: DecoderStack, index: int, updated: dict, inexact_masks: dict) -> dict[str, torch.Tensor]:
    """Phase 6: the block's tensors as they are to be stored, in the checkpoint's dtype, its device
    memory released.  Updated weights are their float32 results rounded once to the checkpoint's dtype;
    the others are cast back from the compute dtype where that is exact (float16 or bfloat16 computed in
    float32, or no conversion), else read again and masked, so their kept entries are the input's bits."""
    stored = stack.unload_block(index)
    stored.update(updated)
    for key in [k for k in stored if not stack.holds_exactly(k) and k not in updated]:
        original = stack.reader.read([key])[key]
        if key in inexact_masks:
            original.masked_fill_(~inexact_masks[key], 0)
        stored[key] = original
    return stored


def prune_block(
    stack: DecoderStack, index: int, block, acts: Activations | None, config: PruneConfig
) -> tuple[dict[str, torch.Tensor], dict[str, Groups]]:
    """Prunes block `index` (loaded: `block`) with the configured method and advances `acts` through it.

    Returns the block's tensors as they are to be stored and each pruned weight's comparison groups (for
    its post-condition, verify_and_write).  `acts` is None for methods that need no statistics, which
    run no forward passes.  Raises NumericalError for activations that overflow.
    """
    statistics = reduce(collect(stack, index, block, acts, config))
    config, choice = choose(stack, index, block, acts, statistics, config)
    updated, inexact_masks, groups = decide_and_apply(stack, index, block, statistics, config)
    del statistics  # Gram matrices: gone before the pruned pass needs its memory
    propagate(stack, index, acts, config)
    return export(stack, index, updated, inexact_masks), groups, choice


def choice_rows(rows: int, count: int, seed: int) -> list[int]:
    """`count` of the `rows` calibration windows (all if fewer), drawn with `seed`, in order: the same
    for every block of a run."""
    if count >= rows:
        return list(range(rows))
    return sorted(torch.randperm(rows, generator=torch.Generator().manual_seed(seed))[:count].tolist())


def choose(stack, index, block, acts, statistics, config) -> tuple[PruneConfig, dict | None]:
    """Phase 3a, for methods that choose per block (en-auto): the configuration this block is pruned
    with, and the record of the choice; other methods keep theirs."""
    method = get_method(config.method)
    if not method.chooses_per_block:
        return config, None
    rows = acts.hidden.shape[0]
    view = BlockView(index, linear_layers(block),
                     lambda count: stack.block_outputs(index, acts, choice_rows(rows, count, config.seed), config.batch_size))
    return method.choose(view, statistics, config)


def verify_and_write(writer: CheckpointWriter, index: int, pruned: dict, groups: dict, config: PruneConfig) -> dict:
    """Checks every pruned weight of block `index` (verified_sparsity), then writes the block's shard.

    Returns {name: share of zeros} for the manifest.  It runs where the write runs (in the background
    with --overlap), so on a GPU the check overlaps the next block's computation.  Raises NumericalError
    before anything of the block is written.
    """
    sparsity = {key: verified_sparsity(key, pruned[key], config.sparsity, group) for key, group in groups.items()}
    writer.write_shard(index, pruned)
    return sparsity


def statistics_bytes(stack: DecoderStack, config: PruneConfig) -> int:
    """Device memory a block's statistics and their use take, at most: with `gram`, an in_features^2
    matrix per linear in float32 (float64 when computing in float64); linears fed one tensor share one,
    so this is an upper bound (LLaMA-2-7B: 0.87 GB counted, 0.68 GB used).  Where weights are updated
    (OBS), the update of the largest linear: two more in_features^2 matrices (obs.inverse_factor) and the
    weight, its copy and its mask in the work dtype.  The norms are vectors, not counted."""
    if "gram" not in config.statistics:
        return 0
    itemsize = 8 if stack.dtype == torch.float64 else 4
    shapes = [stack.reader.shapes[k] for k in stack.block_keys(0) if k.endswith(".weight")]
    shapes = [shape for shape in shapes if len(shape) == 2]
    grams = itemsize * sum(shape[1] ** 2 for shape in shapes)
    update = max(2 * itemsize * shape[1] ** 2 + (2 * itemsize + 1) * shape[0] * shape[1] for shape in shapes)
    return grams + update


def _check_config_fits(stack: DecoderStack, config: PruneConfig) -> None:
    """Refuses, before anything is read or written, a pattern or method option the block's weights
    cannot take (inputs not divisible by M)."""
    method = get_method(config.method)
    for key in stack.block_keys(0):
        shape = stack.reader.shapes[key]
        if not (key.endswith(".weight") and len(shape) == 2):
            continue
        if config.pattern and shape[1] % parse_pattern(config.pattern)[1]:
            m = parse_pattern(config.pattern)[1]
            raise StreamPruneError(f"pattern {config.pattern}: {key} has {shape[1]} inputs, not divisible by {m}")
        method.check_config(config, shape[1])


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
        log.warning("stopping after the block in progress is written%s",
                    " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else " (SIGTERM)")

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


def owl_pass(stack: DecoderStack, acts: Activations | None, config: PruneConfig, show_progress: bool, overlap: bool) -> list[float]:
    """OWL's first pass (budgets.py): each block's outlier ratio, with the run's method's outlier scores
    from the statistics of the dense block's inputs; the hidden states go through the dense blocks, so
    afterwards they are the last block's inputs (the caller embeds again for the pruning pass).  Holds
    what a pruning pass holds: one block and its statistics.  Raises NumericalError where the
    activations overflow (check_statistics)."""
    method = get_method(config.method)
    m = config.option_values["owl_m"]
    ratios = []
    with BlockWalker(stack, read_ahead=overlap) as walker, progress_bars.bar(
        total=stack.num_blocks, desc="Outlier ratios (OWL)", unit="block", enabled=show_progress
    ) as bar:
        for index, block in walker.blocks(range(stack.num_blocks)):
            statistics = collect(stack, index, block, acts, config, method.outlier_needs)
            with torch.no_grad():
                scores = [method.outlier_scores(linear.weight, statistics.get(name), config)
                          for name, linear in linear_layers(block).items()]
            ratios.append(outlier_ratio(scores, m))
            del scores, statistics
            propagate(stack, index, acts, config)  # through the dense block
            bar.update()
    return ratios


def _prune_blocks(stack, acts, config, start_block, writer, manifest, record, show_progress, overlap, sparsities=None) -> None:
    """Replays the blocks an earlier session wrote, then prunes and writes the rest, one at a time.

    With overlap, block i+1 is read from disk while block i computes (BlockWalker), and block i is
    checked and written while block i+1 computes; a block counts as done (in the manifest) only once its
    shard is in place.
    """
    writes = _Background(overlap)

    def config_of(index: int) -> PruneConfig:  # the block's own sparsity under --budgets owl
        return config if sparsities is None else dataclasses.replace(config, sparsity=sparsities[index])

    def written_shard(index: int) -> CheckpointReader:
        return CheckpointReader(writer.out_dir, files=[writer.shard_path(index).name])

    def finish(index: int, written: Future, block_seconds: float, choice: dict | None) -> None:
        sparsity = written.result()  # raises what the check or the write raised (a full disk)
        manifest.sparsity.update({key: round(fraction, 6) for key, fraction in sparsity.items()})
        if choice is not None:
            manifest.block_choices[str(index)] = choice
        manifest.timings["blocks_s"].append(round(block_seconds, 3))
        record(blocks_done=index + 1)
        bar.update()
        if stop_asked():  # after the last block too: a sweep must stop, and the rerun only writes the rest
            record(status="interrupted")
            raise Interrupted(
                f"stopped after block {index + 1} of {stack.num_blocks}; {rerun_hint()} where it stopped"
            )

    replay = acts is not None and 0 < start_block < stack.num_blocks  # with every block written, nothing to replay
    with stop_requests() as stop_asked, BlockWalker(stack, read_ahead=overlap) as walker:
        if replay:  # a bar of its own: replaying is faster than pruning, and would skew the pruning bar's rate
            with progress_bars.bar(total=start_block, desc="Replaying written blocks", unit="block", enabled=show_progress,
                                   leave=False) as replaying:
                for index, _ in walker.blocks(range(start_block), reader_for=written_shard):
                    stack.run_block(index, acts, config.batch_size, write_back=True)
                    replaying.update()
        with progress_bars.bar(total=stack.num_blocks, desc="Pruning blocks", unit="block", enabled=show_progress,
                               initial=start_block) as bar:
            pending = None
            try:
                lap = time.perf_counter()
                for index, block in walker.blocks(range(start_block, stack.num_blocks)):
                    pruned, groups, choice = prune_block(stack, index, block, acts, config_of(index))
                    if pending is not None:
                        finish(*pending)
                    written = writes.submit(verify_and_write, writer, index, pruned, groups, config_of(index))
                    pending = (index, written, time.perf_counter() - lap, choice)  # seconds since the last block: loading included
                    lap = time.perf_counter()
                    del pruned  # held by the writer until written, and no longer: a block must not linger
                    if not overlap:
                        finish(*pending)
                        pending = None
                if pending is not None:
                    finish(*pending)
            finally:
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

    Options are PruneConfig's fields (method, sparsity, pattern, reconstruct, calib, nsamples, seqlen,
    ...) and the method's own options (alpha, percdamp, ...), given either as a PruneConfig or as keyword
    arguments.  An unfinished run in `output` with the same
    options is resumed (resume=False starts it over).  `budget` says where the calibration hidden states
    may live (placement.py); `overlap` reads and writes blocks in the background (default: on CUDA).
    Neither changes the result.  Returns the final run manifest.
    """
    if config is not None and options:  # the keywords would be dropped unseen (a misspelt one too)
        raise StreamPruneError(f"give either a PruneConfig or keyword options, not both (got {', '.join(sorted(options))} beside the config)")
    config = config or PruneConfig.of(**options)
    started = time.perf_counter()
    out = Path(output).expanduser()
    budget = budget or Budget()
    if budget.offload_dir is None:
        budget = dataclasses.replace(budget, offload_dir=str(out))
    model_dir = resolve_model_dir(str(model))  # a hub id downloaded (or found in the cache) first
    # before the model is opened (its skeleton built: seconds for a large one) and before anything is read
    # from the output or written to it: the same command started twice is refused at once
    lock = OutputLock(out, model_dir)
    try:
        opened = open_model(model_dir, config.device, config.dtype, trust_remote_code, budget)
        stack, device = opened.stack, opened.stack.device
        warn_beyond_context(config.seqlen, getattr(stack.text_config, "max_position_embeddings", None))
        _check_config_fits(stack, config)
        current = RunManifest(
            model=str(model), config=config.to_dict(), blocks_total=stack.num_blocks, device=str(device),
            dtype=str(stack.dtype).removeprefix("torch."), input_fingerprint=input_fingerprint(opened.model_dir),
        )
        plan = plan_run(out, current, overwrite, resume)
        manifest = plan.manifest
        if checks.ENABLED:  # embeddings, final norm, LM head: refused now, not after the last block
            stack.reader.check_tensors(stack.non_block_keys())
        calibration: CalibrationSet
        # a method that gathers no statistics (magnitude) runs no block forward: no corpus to load or download
        uses_calibration = bool(config.statistics)  # OWL's outlier ratios of such a method come from its weights
        no_text = CalibrationSet(torch.zeros((0, config.seqlen), dtype=torch.int64))
        if plan.resumed:
            remove_partial_files(out)
            calibration = recorded_windows(out / manifest.calibration_ids, config.nwindows, config.seqlen) if uses_calibration else no_text
            log.warning("resuming the unfinished run in %s: %d of its %d blocks are done", out, plan.start_block, stack.num_blocks)
        else:
            calibration = (calibration_windows(config.calib, opened.tokenizer, config.nwindows, config.seqlen, config.seed, progress)
                           if uses_calibration else no_text)
            _check_token_ids(calibration, stack, config.calib)
            make_output(out)
            save_windows(out / CALIBRATION_IDS_FILE, calibration)
        earlier_seconds = manifest.timings["total_s"]
        manifest.status, manifest.error = "running", None
        manifest.calibration = calibration.summary()
        manifest.checked = manifest.checked and checks.ENABLED
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

        try:
            def embed() -> Activations | None:  # block 0's inputs, again after OWL's first pass
                return stack.embed(calibration.input_ids, config.batch_size, statistics_bytes(stack, config)) if config.statistics else None

            # every block written (a run stopped after its last): only the rest of the checkpoint is left to write
            acts = embed() if plan.start_block < stack.num_blocks else None
            manifest.placement = acts.placement if acts else manifest.placement
            if not plan.resumed:
                manifest.timings["calibration_s"] = round(time.perf_counter() - started, 3)
            overlap = device.type == "cuda" if overlap is None else overlap
            try:
                sparsities = None
                if config.budgets == "owl":
                    budgets, acts = _owl_budgets(stack, acts, embed, config, out, plan.resumed, progress, overlap)
                    sparsities = budgets["sparsities"]
                    record(budgets=budgets)
                writer = CheckpointWriter(out, total_shards=stack.num_blocks + 1)
                _prune_blocks(stack, acts, config, plan.start_block, writer, manifest, record, progress, overlap, sparsities)
            finally:
                if acts is not None:
                    acts.close()
            writer.write_shard(stack.num_blocks, stack.reader.read(stack.non_block_keys()))
            writer.copy_metadata(opened.model_dir)
            writer.write_index()
        except Interrupted as exc:  # recorded as interrupted where it stopped
            starts_over = [flag for flag, on in (("--overwrite", overwrite), ("--no-resume", not resume)) if on]
            if starts_over:  # the same command would start over, deleting the blocks written
                raise Interrupted(str(exc).replace(rerun_hint(), rerun_hint(starts_over))) from None
            raise
        except KeyboardInterrupt:  # a second Ctrl-C, at once: the manifest must not go on saying running
            with contextlib.suppress(Exception):
                record(status="interrupted")
            raise
        except Exception as exc:
            _record_failure(record, exc)
            raise
        record(status="complete", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        return manifest
    finally:
        lock.release()


def _owl_budgets(stack, acts, embed, config, out, resumed, progress, overlap) -> tuple[dict, Activations | None]:
    """The run's OWL budgets: those saved by the session that started it, else from a first pass (then
    saved, and the hidden states embedded again for the pruning pass).  Returns them and the hidden
    states to prune with."""
    budgets = load_budgets(out / BUDGETS_FILE, stack.num_blocks) if resumed else None
    if budgets is not None:
        return budgets, acts
    ratios = owl_pass(stack, acts, config, progress, overlap)  # a run killed before this ends does it again
    options = config.option_values
    budgets = {
        "budgets": "owl", "owl_m": options["owl_m"], "owl_lambda": options["owl_lambda"], "sparsity": config.sparsity,
        "outlier_ratios": ratios, "sparsities": owl_sparsities(ratios, config.sparsity, options["owl_lambda"]),
    }
    save_budgets(out / BUDGETS_FILE, budgets)
    if acts is not None:
        acts.close()
        acts = embed()
    return budgets, acts


def _check_token_ids(calibration: CalibrationSet, stack: DecoderStack, source) -> None:
    """Refuses calibration token ids outside the model's vocabulary (input ids saved from a run on another
    model, --calib IDS.safetensors), before anything is written: the embedding would fail on them."""
    vocab = getattr(stack.text_config, "vocab_size", None)
    ids = calibration.input_ids
    if not vocab or not ids.numel():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise StreamPruneError(f"calibration token id {high if high >= vocab else low} (from --calib {source}) is outside the "
                               f"model's vocabulary of {vocab:,} ids; were they made with another model's tokenizer?")


def _record_failure(record, exc: Exception) -> None:
    """The manifest says `failed` and why (a rerun of the same command resumes after the last block
    written); if even that cannot be written (a full disk), it keeps saying `running`."""
    try:
        record(status="failed", error=one_line(exc) or type(exc).__name__)
    except Exception:  # the original error is the one to report
        pass
