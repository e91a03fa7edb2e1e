"""The `streamprune` command line: click commands, tqdm bars, one-line errors."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

from . import progress
from .config import DTYPES, STAT_NORMS, PruneConfig
from .errors import StreamPruneError, lm_eval_context, one_line, rerun_hint
from .families import TESTED
from .placement import PLACEMENTS, Budget, parse_size
from .methods import METHODS, all_options, option_text
from .budgets import BUDGETS
from .budgets import OPTIONS as OWL_OPTIONS
from .obs import OPTIONS as OBS_OPTIONS


class _Group(click.Group):
    """Every failure ends as one `Error: ...` line on stderr and a non-zero exit status."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            progress.close_all()
            progress.message(f"Error: {exc.format_message()}")
            code = exc.exit_code
        except (click.Abort, KeyboardInterrupt):
            progress.close_all()
            argv = [str(arg) for arg in (sys.argv[1:] if args is None else args)]
            given = [arg for arg in argv if not arg.startswith("-")]
            hint = ""
            if given[:1] == ["sweep"]:  # its results are kept, --overwrite or not, while its settings are the same
                hint = f"; {rerun_hint()}"
            elif given[:1] == ["prune"]:  # --overwrite and --no-resume would start it over
                hint = f"; {rerun_hint([flag for flag in ('--overwrite', '--no-resume') if flag in argv])}"
            progress.message("Error: interrupted" + hint)
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


def reports_errors(command):
    """Turns exceptions into one-line errors; --debug (or STREAMPRUNE_DEBUG=1) shows the traceback."""

    @click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
    @functools.wraps(command)
    def wrapper(*args, debug: bool, **kwargs):
        debug = debug or os.environ.get("STREAMPRUNE_DEBUG") == "1"
        _quiet_libraries()
        try:
            return command(*args, **kwargs)
        except (click.ClickException, click.Abort, click.exceptions.Exit, KeyboardInterrupt):
            raise
        except StreamPruneError as exc:
            if debug:
                raise
            error = click.ClickException(one_line(exc))
            error.exit_code = getattr(exc, "exit_code", 1)
            raise error from None
        except Exception as exc:  # a bug or an environment problem: still one line, unless --debug
            if debug:
                raise
            if _is_gpu_out_of_memory(exc):
                raise click.ClickException(
                    f"the GPU ran out of memory ({'. '.join(one_line(exc).split('. ')[:2])}); lower --batch-size, set --offload cpu "
                    "(hidden states in host memory), or raise --max-gpu-memory if you gave one"
                ) from None
            if isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError)) and exc.filename:
                # a file or folder that cannot be read or written (another user's, immutable): say which, plainly
                raise click.ClickException(f"cannot access {exc.filename}: {exc.strerror} (--debug shows where)") from None
            # lm-eval's own messages may begin with "Error: ", which the line already does
            message = f"{type(exc).__name__}: {one_line(exc).removeprefix('Error: ')}{lm_eval_context(exc)} (rerun with --debug for the traceback)"
            raise click.ClickException(message) from None

    return wrapper


def _is_gpu_out_of_memory(exc: Exception) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def _quiet_libraries() -> None:
    """Our own bars and warnings only: transformers' loading bars and notices would drown them."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()  # its connection retries; the final error is reported as one line
    show_warnings()


def show_warnings() -> None:
    """streamprune's warnings as `Warning: ...` lines on stderr (once per process, however often called)."""
    logger = logging.getLogger("streamprune")
    if not any(isinstance(h, _WarningLines) for h in logger.handlers):
        logger.addHandler(_WarningLines())
        logger.propagate = False


class _WarningLines(logging.Handler):
    """`Warning: ...` on a line of its own, on whatever stderr is current (click's test runner swaps it)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)

    def emit(self, record):
        progress.message(f"Warning: {one_line(record.getMessage())}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def memory_options(command):
    """--offload, --max-gpu-memory, --max-cpu-memory, --offload-dir: where hidden states may live."""
    for option in reversed([
        click.option("--offload", type=click.Choice(PLACEMENTS), default="auto", show_default=True,
                     help="Where the hidden states live: on the device, in host memory (streamed to the GPU), "
                          "or on disk; auto picks the first that fits the limits."),
        click.option("--max-gpu-memory", default=None, help="GPU memory this run may use, e.g. 3GiB (default: 90% of free): the hidden states go to host memory when they and a block at work do not fit, and PyTorch's allocator is capped there."),
        click.option("--max-cpu-memory", default=None, help="Host memory the hidden states may use, e.g. 8GiB (default: 80% of available)."),
        click.option("--offload-dir", type=click.Path(file_okay=False), default=None,
                     help="Folder for --offload disk (default: the output directory; for eval the system's temporary folder)."),
    ]):
        command = option(command)
    return command


def method_options(command):
    """--alpha, --percdamp, ...: every option of every method (and of --reconstruct), from the registry."""
    for option, users in reversed(list(all_options(extra=OBS_OPTIONS + OWL_OPTIONS).values())):
        where = ", ".join(users + (["--reconstruct"] if option in OBS_OPTIONS else []) + (["--budgets owl"] if option in OWL_OPTIONS else []))
        kind = click.Choice(option.choices) if option.choices else str if option.numbers else int if option.integer else float
        command = click.option(
            option.flag, option.name, type=kind, default=None, help=f"{option.help} [{where}; default {option.text(option.default)}]",
        )(command)
    return command


def _budget(offload, max_gpu_memory, max_cpu_memory, offload_dir) -> Budget:
    """The memory options as a Budget; --offload-dir checked now (files must be writable there)."""
    if offload_dir:
        from .checkpoint import check_writable

        check_writable(Path(offload_dir), f"to --offload-dir {offload_dir}")
    return Budget(offload, parse_size(max_gpu_memory), parse_size(max_cpu_memory), offload_dir)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="streamprune")
def main():
    """Prune decoder-only language models one block at a time (Wanda, Elastic-Net Wanda, SparseGPT, ...)."""


@main.command()
@click.argument("model")
@click.argument("output", type=click.Path(file_okay=True, dir_okay=True, path_type=Path))
@click.option("--method", type=click.Choice(list(METHODS)), default="en-modified", show_default=True,
              help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + " (streamprune methods lists them).")
@method_options
@click.option("--reconstruct", is_flag=True,
              help="After a mask-only method's mask, update the kept weights (OBS, mask held) to minimise the layer's output error.")
@click.option("--sparsity", type=float, default=0.5, show_default=True, help="Share of each comparison group to zero, in [0, 1).")
@click.option("--pattern", default=None, help="Semi-structured N:M sparsity instead, e.g. 2:4 or 4:8.")
@click.option("--budgets", type=click.Choice(BUDGETS), default="uniform", show_default=True,
              help="Per-block sparsity: uniform, or owl (OWL, Yin et al. 2024: blocks with more outlier scores pruned less; mean --sparsity).")
@click.option("--calib", default="wikitext103", show_default=True,
              help="wikitext103, c4 (from the hub), a text/.raw/.jsonl file or folder, or an input_ids .safetensors file.")
@click.option("--nsamples", type=int, default=128, show_default=True, help="Calibration windows.")
@click.option("--calib-mult", type=int, default=1, show_default=True, help="Draw nsamples * calib-mult windows.")
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the window sampling.")
@click.option("--stat-norm", type=click.Choice(STAT_NORMS), default="mean", show_default=True,
              help="mean: norms divided by the token count; sum: raw norms.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N; auto = cuda if available.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="Compute dtype; auto = the checkpoint's. The output keeps the checkpoint's dtype.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Windows per calibration forward pass.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--no-resume", is_flag=True, help="Start an unfinished run in OUTPUT over instead of resuming it.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a checkpoint's own Python code to run.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--overlap/--no-overlap", default=None,
              help="Read the next block and write the last one in the background (default: on CUDA only).")
@memory_options
@reports_errors
def prune(model, output, overwrite, no_resume, trust_remote_code, quiet, overlap, offload, max_gpu_memory,
          max_cpu_memory, offload_dir, **options):
    """Prune MODEL (a local directory or a hub id) into the directory OUTPUT.

    Rerunning the same command on an unfinished OUTPUT (crash, kill, Ctrl-C, full disk) resumes it.
    """
    from .config import parse_pattern

    sparsity_given = click.get_current_context().get_parameter_source("sparsity") == click.core.ParameterSource.COMMANDLINE
    if options["pattern"] and sparsity_given:
        n, m = parse_pattern(options["pattern"])
        if options["sparsity"] != n / m:
            raise click.UsageError(
                f"--pattern {options['pattern']} prunes {n / m:.0%} by itself; give --sparsity or --pattern, not both"
            )
    given = {name: value for name, value in options.items() if value is not None or name not in all_options(OBS_OPTIONS + OWL_OPTIONS)}
    config = PruneConfig.of(**given)
    from .engine import prune as run_prune  # transformers with it: after the options are checked, which is then quick

    manifest = run_prune(
        model, output, config, overwrite=overwrite, resume=not no_resume, trust_remote_code=trust_remote_code,
        progress=not quiet, budget=_budget(offload, max_gpu_memory, max_cpu_memory, offload_dir), overlap=overlap,
    )
    zeros = sum(manifest.sparsity.values()) / max(len(manifest.sparsity), 1)
    mix = "".join(f", {name} {option_text(value)}" for name, value in config.options) + (", reconstructed" if config.reconstruct else "")
    shape = config.pattern or f"{config.sparsity:.0%}"
    click.echo(
        f"Pruned {manifest.blocks_total} blocks with {config.method}{mix} ({shape}; mean sparsity of the "
        f"{len(manifest.sparsity)} linear weights {zeros:.2%}) in {manifest.timings['total_s']:.1f} s "
        f"on {manifest.device}, peak host memory {_gib(manifest.peak_memory['host_rss_bytes'])}."
    )
    if manifest.block_choices:
        click.echo(METHODS[config.method].choices_summary(manifest.block_choices))
    if manifest.budgets:
        budgets = manifest.budgets["sparsities"]
        click.echo(f"OWL budgets: {min(budgets):.2%} to {max(budgets):.2%} per block (mean {sum(budgets) / len(budgets):.2%}); "
                   "streamprune inspect OUTPUT shows each")
    click.echo(f"Output: {output}  (loads with AutoModelForCausalLM.from_pretrained; manifest in streamprune.json)")


def _task_list(ctx, param, value) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.split(",") if name.strip()) if value else ()


def _names(ctx, param, value) -> tuple[str, ...] | None:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def _assignments(value, need_values: bool):
    """('name=v1,v2', ...) -> (name with dashes as underscores, 'v1,v2') pairs; BadParameter for others."""
    for item in value:
        name, sep, values = item.partition("=")
        if not sep or not name.strip() or (need_values and not values.strip()):
            raise click.BadParameter(f"{item!r} is not NAME=V1,V2,...")
        yield name.strip().replace("-", "_"), values


def _option_grid(ctx, param, value) -> dict:
    """('percdamp=0.01,0.1', ...) -> {'percdamp': (0.01, 0.1)}."""
    return {name: _numbers(ctx, param, values) for name, values in _assignments(value, need_values=False)}


def _field_grid(ctx, param, value) -> dict:
    """('nsamples=64,128', 'tasks=boolq+hellaswag,boolq') -> {'nsamples': ['64', '128'], 'tasks': [...]};
    the sweep turns each value into its field's type."""
    return {name: [v.strip() for v in values.split(",") if v.strip()] for name, values in _assignments(value, need_values=True)}


def _numbers(ctx, param, value) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from exc


@main.command(name="eval")
@click.argument("model")
@click.option("--ppl", default=None, help="Perplexity text: wikitext103 (validation), wikitext2 (test), c4 (validation; all from the hub), or a local text or .jsonl file; none (the default): no perplexity.")
@click.option("--ppl-slices", type=int, default=None, help="Also report perplexity on this many evenly spaced slices (the paper: 7).")
@click.option("--tasks", default="", callback=_task_list,
              help="Comma-separated tasks: the built-in boolq,hellaswag,phishing (offline, zero-shot) or any "
                   "lm-evaluation-harness task, streamed (pip install 'streamprune[lmeval]').")
@click.option("--include-path", type=click.Path(exists=True, file_okay=False), default=None,
              help="lm-eval: a folder of task YAMLs to add to its tasks.")
@click.option("--num-fewshot", type=int, default=None, help="lm-eval: examples in each prompt (default: the task's own).")
@click.option("--seed", type=int, default=None,
              help="lm-eval: the seed of sampled generations and few-shot draws, as lm_eval --seed N (default: lm-eval's own, "
                   "0 for Python's random and 1234 for numpy, torch and few-shot sampling).")
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Perplexity window length.")
@click.option("--max-windows", type=int, default=None, help="Perplexity on the first N windows only.")
@click.option("--limit", type=int, default=None,
              help="Examples per task: for the built-in tasks a fixed, seeded subset of N; for lm-eval tasks lm-eval's first N.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Offline task data (boolq/val.jsonl, hellaswag/hellaswag_val_full.txt, phishing/*.csv); default: the hub.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Rows per forward pass, of the longest; shorter rows go as many as make the same number of tokens.")
@click.option("--max-resident-tokens", type=int, default=2**18, show_default=True,
              help="Padded tokens whose hidden states are kept at once; more are streamed in several rounds.")
@click.option("--share-contexts/--no-share-contexts", default=True, show_default=True,
              help="Run a context that several answers follow, and a start that several prompts share (the same "
                   "few-shot examples), once per block; --no-share-contexts reads every request whole (the same "
                   "numbers, more time).")
@click.option("--baseline", default=None, help="Also evaluate this (dense) model and print both with the difference.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the results here.")
@click.option("--load-in-8bit", is_flag=True, help="Whole model through transformers + bitsandbytes (CUDA).")
@click.option("--load-in-4bit", is_flag=True, help="Whole model through transformers + bitsandbytes (CUDA).")
@click.option("--trust-remote-code", is_flag=True, help="Allow a checkpoint's own Python code to run.")
@click.option("--quiet", is_flag=True, help="No progress bars, nor the line on the work done.")
@memory_options
@reports_errors
def evaluate_command(model, baseline, json_path, trust_remote_code, quiet, data_dir, offload, max_gpu_memory,
                     max_cpu_memory, offload_dir, **options):
    """Perplexity and zero-shot accuracy of MODEL, one block resident at a time."""
    from .checkpoint import check_writable, resolve_model_dir, write_json
    from .evaluate.runner import EvalConfig, differences, evaluate, format_table
    from .evaluate.work import Work

    if str(options.get("ppl")).lower() in ("none", "null"):  # as sweep takes it: no perplexity
        options["ppl"] = None
    config = EvalConfig(data_dir=str(data_dir) if data_dir else None, **options)
    budget = _budget(offload, max_gpu_memory, max_cpu_memory, offload_dir)
    if baseline:
        baseline = str(resolve_model_dir(baseline))  # a wrong path fails now, not after MODEL's evaluation
    if json_path:  # checked now, not after the evaluation (click already refuses a directory)
        check_writable(json_path.parent, f"--json {json_path}")
    results = evaluate(model, config, trust_remote_code=trust_remote_code, progress=not quiet, budget=budget)
    reference = (
        evaluate(baseline, config, trust_remote_code=trust_remote_code, progress=not quiet, budget=budget) if baseline else None
    )
    click.echo(format_table(results, reference))
    for name, done in ((model, results), (baseline, reference)):
        if done and done.get("work") and not quiet:  # beside the table: how, not what, the numbers were computed
            click.echo(f"{name}: {Work.from_dict(done['work']).describe()}", err=True)
    if json_path:
        payload = {**results, "baseline": reference, "difference": differences(results, reference)} if reference else results
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(json_path, payload)
        click.echo(f"Results: {json_path}")


@main.command()
def methods():
    """The pruning methods: name, what each scores or minimises, its options, its source."""
    click.echo(methods_table())


@main.command()
def families():
    """The model families the tests check end to end (others whose blocks are found are pruned too)."""
    click.echo(families_table())


def families_table() -> str:
    """The tested families as a Markdown table (the README's architecture list is this)."""
    lines = ["| model_type | checked for |", "|---|---|"]
    lines += [f"| `{model_type}` | {what} |" for model_type, what in TESTED.items()]
    return "\n".join(lines)


def methods_table() -> str:
    """The registry as a Markdown table (the README's method table is this)."""
    lines = ["| method | decides by | comparison group | changes kept weights | options | source |", "|---|---|---|---|---|---|"]
    for method in METHODS.values():
        options = ", ".join(f"`{o.flag}` ({o.text(o.default)})" for o in method.options) or "none"
        summary = method.summary.replace("|", "\\|")  # a bare | would end the Markdown cell
        lines.append(f"| `{method.name}` | {summary} | {method.group}; N of M per row with --pattern | "
                     f"{'yes' if method.updates_weights else 'no (yes with --reconstruct)'} | {options} | {method.source} |")
    return "\n".join(lines)


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report (with per-tensor sparsity) here.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a checkpoint's own Python code to run.")
@reports_errors
def inspect(directory, json_path, trust_remote_code):
    """Sparsity per block, blocks done, and a check that every tensor is present with the right shape.

    Exits with status 1 when a tensor is missing, unreadable or of the wrong shape.
    """
    from .checkpoint import check_writable, write_json
    from .inspect import format_report, inspect_checkpoint

    if json_path:  # checked now, not after the report (its folder is made, as eval's --json)
        check_writable(json_path.parent, f"--json {json_path}")
    report = inspect_checkpoint(directory, trust_remote_code)
    click.echo(format_report(report))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(json_path, report)
    if report["problems"]:
        raise click.exceptions.Exit(1)


@main.command()
@click.argument("model")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--spec", "spec_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A JSON or YAML file with any of the sweep's settings; options given here win.")
@click.option("--methods", callback=_names, help=f"Comma-separated methods ({', '.join(METHODS)}); default: the EN geometries.")
@click.option("--alphas", callback=_numbers, help="Comma-separated alphas (default 0,0.25,0.5,0.75,1), for every method taking --alpha.")
@click.option("--geometries", callback=_names, help="original,modified (EN-Original, EN-Modified), when --methods is not given.")
@click.option("--option", "options", multiple=True, callback=_option_grid,
              help="NAME=V1,V2,...: values of another method option, e.g. --option percdamp=0.01,0.1 (repeatable).")
@click.option("--reconstruct", type=click.Choice(["no", "yes", "both"]), default=None,
              help="Mask-only methods without --reconstruct (no, the default), with it, or both.")
@click.option("--grid", "grid", multiple=True, callback=_field_grid,
              help="NAME=V1,V2,...: values of any other setting below, e.g. --grid nsamples=32,128 or "
                   "--grid seqlen=512,2048 (tasks: boolq+hellaswag); a section of results per setting (repeatable).")
@click.option("--seeds", type=int, default=None, help="Calibration draws per configuration (default 1): tables give mean ± std.")
@click.option("--sparsities", callback=_numbers, help="Comma-separated sparsities (default 0.5).")
@click.option("--patterns", callback=_names, help="unstructured and/or N:M patterns, e.g. unstructured,2:4.")
@click.option("--tasks", callback=_names, help="Tasks to evaluate: boolq,hellaswag,phishing, or any lm-eval task.")
@click.option("--ppl", default=None, help="Perplexity text (default wikitext103; none: no perplexity, the tasks alone).")
@click.option("--ppl-slices", type=int, default=None)
@click.option("--seqlen", type=int, default=None, help="Perplexity window (default 2048).")
@click.option("--max-windows", type=int, default=None)
@click.option("--limit", type=int, default=None, help="Examples per task (built-in: a fixed seeded subset; lm-eval: its first N).")
@click.option("--data-dir", default=None, help="Offline task data (the shared data layout).")
@click.option("--include-path", default=None, help="lm-eval: a folder of task YAMLs to add to its tasks.")
@click.option("--num-fewshot", type=int, default=None, help="lm-eval: examples in each prompt (default: the task's own).")
@click.option("--calib", default=None, help="Calibration source (default wikitext103); drawn once for the sweep.")
@click.option("--nsamples", type=int, default=None)
@click.option("--calib-seqlen", type=int, default=None, help="Tokens per calibration window (default 2048).")
@click.option("--seed", type=int, default=None)
@click.option("--stat-norm", type=click.Choice(STAT_NORMS), default=None)
@click.option("--budgets", type=click.Choice(BUDGETS), default=None,
              help="uniform (default) or owl per-block sparsities; both: --grid budgets=uniform,owl (N:M patterns are skipped under owl).")
@click.option("--device", default=None)
@click.option("--dtype", type=click.Choice(DTYPES), default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--keep/--no-keep", default=None, help="Keep the pruned checkpoints (default: delete each once evaluated).")
@click.option("--overwrite", is_flag=True, help="Replace an OUTDIR that holds another sweep or something else.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@memory_options
@reports_errors
def sweep(model, outdir, spec_file, overwrite, quiet, offload, max_gpu_memory, max_cpu_memory, offload_dir, **options):
    """Prune and evaluate MODEL over a grid (methods, alpha and other options, reconstruction, sparsity,
    patterns, calibration draws, and any other setting with --grid) into OUTDIR; rerun to continue.

    Writes results.json, results.csv, results.md (the paper's table) and plots/*.png.
    """
    from .sweep import SweepSpec, run_sweep

    given = {name: value for name, value in options.items() if value is not None and value != {}}
    if "reconstruct" in given:
        given["reconstruct"] = {"no": (False,), "yes": (True,), "both": (False, True)}[given["reconstruct"]]
    spec = SweepSpec.from_file(spec_file, **given) if spec_file else SweepSpec(**given)
    rows = run_sweep(model, outdir, spec, overwrite=overwrite, progress=not quiet,
                     budget=_budget(offload, max_gpu_memory, max_cpu_memory, offload_dir), echo=click.echo)
    pruned = sum(row["label"] != "dense" for row in rows)  # a dense row per evaluation setting (--seeds, ...)
    click.echo(f"{pruned} configuration{'s' if pruned != 1 else ''} and the dense model: {outdir / 'results.md'}, results.csv, "
               f"results.json, plots/")
    failed = [row for row in rows if "failed" in row]
    if failed:  # the results are written, but a script must not take the sweep for a success
        raise click.ClickException(
            f"{len(failed)} of {pruned} configurations failed ({failed[0]['label']}: {failed[0]['failed']}); "
            f"the reasons are listed in {outdir / 'results.md'}"
        )


@main.command()
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True)
@click.option("--nsamples", type=int, default=32, show_default=True)
@click.option("--seqlen", type=int, default=256, show_default=True)
@click.option("--alpha", type=float, default=0.5, show_default=True)
@click.option("--eval-windows", type=int, default=24, show_default=True, help="Perplexity windows of seqlen tokens.")
@click.option("--cache", type=click.Path(path_type=Path), default=None, help="Where the model is built (default: ~/.cache/streamprune).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@reports_errors
def demo(device, dtype, nsamples, seqlen, alpha, eval_windows, cache, quiet):
    """Prune SmolLM2-135M to 50% with EN-Modified on bundled WikiText; compare perplexities."""
    from .demo import run_demo

    run_demo(device=device, dtype=dtype, nsamples=nsamples, seqlen=seqlen, alpha=alpha, eval_windows=eval_windows,
             cache=cache, progress=not quiet, echo=click.echo)


if __name__ == "__main__":
    main()
