"""`streamprune eval`: perplexity and zero-shot accuracy of a checkpoint, streamed block by block."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from .. import progress as progress_bars
from ..checks import first_nonfinite, wider_dtypes
from ..errors import NumericalError, StreamPruneError, did_you_mean, one_line
from ..loading import choose_device, load_tokenizer, open_model, warn_beyond_context
from ..placement import Budget
from ..checkpoint import resolve_model_dir
from ..hub import Offline, datasets_from_cache_when_offline, unreachable_note
from ..state import peak_memory, reset_peak_memory, versions
from .loglikelihood import streamed_logprobs, whole_model_logprobs
from .perplexity import load_text, perplexity_from, perplexity_requests
from .tasks import accuracy, all_tasks, get_task, requests_for, subset
from .work import Work, counting

log = logging.getLogger("streamprune")


@dataclass(frozen=True)
class EvalConfig:
    ppl: str | None = None  # wikitext103, wikitext2, c4 or a text file
    ppl_slices: int | None = None
    tasks: tuple[str, ...] = ()
    seqlen: int = 2048
    max_windows: int | None = None
    limit: int | None = None
    data_dir: str | None = None  # offline task data (the layout of the shared data folder)
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 4
    max_resident_tokens: int = 2**18
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    include_path: str | None = None  # lm-eval: a folder of task YAMLs
    num_fewshot: int | None = None  # lm-eval: examples in each prompt (the task's own default if None)
    share_contexts: bool = True  # a context, or a start of prompts, shared by several requests runs once per block
    seed: int | None = None  # lm-eval: its seeds (python, numpy, torch, few-shot), as its --seed N; None: its own 0, 1234, 1234, 1234

    def __post_init__(self):
        if self.harness_tasks:
            harness_available(self.harness_tasks)
            if self.load_in_8bit or self.load_in_4bit:
                raise StreamPruneError("lm-eval tasks are evaluated streamed; for a quantized whole model use lm_eval --model hf")
        elif self.include_path or self.num_fewshot:  # 0 agrees with the built-in tasks, which are zero-shot
            given = " and ".join(name for name, value in (("--include-path", self.include_path), ("--num-fewshot", self.num_fewshot)) if value)
            raise StreamPruneError(f"{given} {'apply' if ' and ' in given else 'applies'} to lm-eval tasks; the built-in tasks "
                                   f"({', '.join(self.tasks)}) are zero-shot; for examples in the prompts, evaluate an lm-eval task "
                                   f"(lm-eval's own boolq or hellaswag through streamprune-lm-eval, or a task YAML of "
                                   f"yours with --include-path)")
        if self.seed is not None and not self.harness_tasks:
            raise StreamPruneError("--seed applies to lm-eval tasks (their sampled generations and few-shot draws); the built-in "
                                   "tasks draw nothing (their --limit subset is fixed): drop --seed")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise StreamPruneError("--num-fewshot must be at least 0")
        if self.num_fewshot and self.builtin_tasks:
            _warn_zero_shot(self.num_fewshot, self.builtin_tasks)
        if not self.ppl and not self.tasks:
            raise StreamPruneError("nothing to evaluate: give --ppl and/or --tasks")
        if self.ppl_slices and not self.ppl:
            raise StreamPruneError("--ppl-slices needs --ppl (the text to slice)")
        for name in ("seqlen", "batch_size", "max_resident_tokens"):
            if getattr(self, name) < 1:
                raise StreamPruneError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("max_windows", "limit", "ppl_slices"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise StreamPruneError(f"--{name.replace('_', '-')} must be at least 1")
        if self.load_in_8bit and self.load_in_4bit:
            raise StreamPruneError("choose one of --load-in-8bit and --load-in-4bit")

    @property
    def builtin_tasks(self) -> tuple[str, ...]:
        return tuple(t for t in self.tasks if t in all_tasks())

    @property
    def harness_tasks(self) -> tuple[str, ...]:
        """Tasks that are not built in: lm-evaluation-harness's (or the YAMLs under include_path)."""
        return tuple(t for t in self.tasks if t not in all_tasks())


@functools.cache  # once per process: a sweep makes a config per configuration
def _warn_zero_shot(num_fewshot: int, builtin: tuple[str, ...]) -> None:
    log.warning("--num-fewshot %d applies to the lm-eval tasks; the built-in tasks (%s) stay zero-shot", num_fewshot, ", ".join(builtin))


def harness_available(tasks) -> None:
    """StreamPruneError when tasks other than the built-in ones are asked for without lm-eval installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise StreamPruneError(
            f"unknown task {tasks[0]!r}; the built-in tasks are {', '.join(all_tasks())}, and any task of "
            "lm-evaluation-harness works once it is installed: pip install 'streamprune[lmeval]'"
        ) from exc


@dataclass
class Scorer:
    """Scores requests with one block resident (streamed) or with a whole bitsandbytes-quantized model."""

    score: object
    tokenizer: object
    max_length: int
    device: torch.device
    dtype: torch.dtype  # the compute dtype, for the advice when numbers overflow
    opened: object = None  # the streamed model (loading.OpenedModel), for lm-eval's tasks


def _streamed_scorer(model: str, config: EvalConfig, trust_remote_code: bool, progress: bool, budget: Budget | None) -> Scorer:
    opened = open_model(model, config.device, config.dtype, trust_remote_code, budget)
    if opened.tokenizer is None:
        raise StreamPruneError(f"{opened.model_dir} has no tokenizer files; evaluation needs one")
    score = partial(
        streamed_logprobs, opened.stack, batch_size=config.batch_size,
        max_resident_tokens=config.max_resident_tokens, progress=progress, share_contexts=config.share_contexts,
    )
    max_length = getattr(opened.stack.text_config, "max_position_embeddings", None) or 2048
    return Scorer(score, opened.tokenizer, max_length, opened.stack.device, opened.stack.dtype, opened)


def _quantized_scorer(model: str, config: EvalConfig, trust_remote_code: bool) -> Scorer:
    """The ordinary transformers loading path with bitsandbytes (CUDA only), for users who prefer it."""
    if not torch.cuda.is_available():
        raise StreamPruneError("--load-in-8bit/--load-in-4bit need CUDA (bitsandbytes); evaluate streamed instead")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise StreamPruneError("--load-in-8bit/--load-in-4bit need bitsandbytes: pip install 'streamprune[bnb]'") from exc
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model_dir = resolve_model_dir(model)
    quantization = BitsAndBytesConfig(load_in_8bit=config.load_in_8bit, load_in_4bit=config.load_in_4bit)
    whole = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization, device_map="auto", trust_remote_code=trust_remote_code
    )
    whole.eval()
    score = partial(whole_model_logprobs, whole, batch_size=config.batch_size)
    max_length = getattr(whole.config, "max_position_embeddings", None) or 2048
    return Scorer(score, load_tokenizer(model_dir, trust_remote_code), max_length, choose_device("cuda"), whole.dtype)


def _perplexity_result(config: EvalConfig, ranges: list[range], logprobs: list[torch.Tensor]) -> dict:
    return {"dataset": config.ppl, "seqlen": config.seqlen, **dataclasses.asdict(perplexity_from(logprobs, ranges))}


def _task_result(task, examples, logprobs: list[torch.Tensor]) -> dict:
    return {**accuracy(examples, logprobs), "primary": task.primary, **task.describe(examples)}


def _window_name(config: EvalConfig, ranges: list[range], number: int) -> str:
    """Perplexity request `number` in words: which window of the text, and its tokens."""
    window = [w for r in ranges for w in r][number] if ranges else number
    start = window * config.seqlen
    return f"perplexity window {window} of {config.ppl} (tokens {start} to {start + config.seqlen - 1})"


def _answer_name(task: str, examples, number: int) -> str:
    """Task request `number` in words: which example of the evaluated ones, and which answer."""
    for index, example in enumerate(examples):
        if number < len(example.choices):
            return f"{task} example {index} of the {len(examples)} evaluated, answer {example.choices[number]!r}"
        number -= len(example.choices)
    raise IndexError(number)


def _check_finite(jobs: list, logprobs: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Raises NumericalError naming the first window or task request whose log-likelihood is not finite."""
    bad = first_nonfinite(logprobs)
    if bad is None:
        return
    offset = 0
    for _, requests, _, name_of in jobs:
        if bad < offset + len(requests):
            values = logprobs[bad]
            value = values[~torch.isfinite(values)][0].item()
            raise NumericalError(
                f"the log-likelihood of {name_of(bad - offset)} is {value} (not finite): the activations overflowed "
                f"{str(dtype).removeprefix('torch.')} or the model is damaged; evaluate with {wider_dtypes(dtype)}"
            )
        offset += len(requests)


def evaluate(
    model: str | Path,
    config: EvalConfig | None = None,
    *,
    trust_remote_code: bool = False,
    progress: bool = True,
    budget: Budget | None = None,
    **options,
) -> dict:
    """Perplexity and/or zero-shot accuracy of `model`; returns the results as a JSON-ready dict.

    `budget` says where the hidden states of the requests may live (placement.py).  Streamed, the
    results' "work" (work.Work.as_dict) counts the token positions every request, built-in and lm-eval's,
    put through each block, against what they take read one by one: what sharing contexts saved.
    """
    config = config or EvalConfig(**options)
    manager = _task_manager(config, progress) if config.harness_tasks else None
    started = time.perf_counter()
    reset_peak_memory(torch.device("cpu"))  # this evaluation's peaks, not the process's so far
    quantized = config.load_in_8bit or config.load_in_4bit
    scorer = (
        _quantized_scorer(str(model), config, trust_remote_code)
        if quantized
        else _streamed_scorer(str(model), config, trust_remote_code, progress, budget)
    )
    if config.ppl:
        warn_beyond_context(config.seqlen, scorer.max_length)
    results: dict = {"model": str(model), "options": dataclasses.asdict(config), "timings": {}}
    # Every request of every job is scored in one streaming pass: the weights are read once.
    jobs = []  # (where the result goes, requests, log-probabilities -> result, request number -> its name)
    if config.ppl:
        requests, ranges = perplexity_requests(
            scorer.tokenizer, load_text(config.ppl), config.seqlen, config.max_windows, config.ppl_slices
        )
        jobs.append(("ppl", requests, partial(_perplexity_result, config, ranges), partial(_window_name, config, ranges)))
    data_dir = Path(config.data_dir) if config.data_dir else None
    for name in config.builtin_tasks:
        task = get_task(name)
        loaded = task.load(data_dir)
        examples = subset(loaded, config.limit)
        if not examples:
            raise StreamPruneError(f"the {name} data has no examples; check --data-dir")
        _warn_limit(config.limit, len(loaded), name, f" in {data_dir}" if data_dir else "")
        requests = requests_for(examples, scorer.tokenizer, scorer.max_length)
        jobs.append((name, requests, partial(_task_result, task, examples), partial(_answer_name, name, examples)))
    results["timings"]["prepare_s"] = round(time.perf_counter() - started, 3)
    scored = [request for _, requests, _, _ in jobs for request in requests]
    logprobs = []
    work = Work() if scorer.opened is not None else None  # streamed: what sharing saved
    if scored:  # lm-eval tasks alone: no pass of our own
        step = time.perf_counter()
        with counting(getattr(scorer.opened, "stack", None), work):
            logprobs = scorer.score(scored)
        if work is not None:
            work.add(Work.scored(scored))
        results["timings"]["scoring_s"] = round(time.perf_counter() - step, 3)
    _check_finite(jobs, logprobs, scorer.dtype)
    offset = 0
    for name, requests, finish, _ in jobs:
        result = finish(logprobs[offset : offset + len(requests)])
        offset += len(requests)
        if name == "ppl":
            results["ppl"] = result
        else:
            results.setdefault("tasks", {})[name] = result
    if config.harness_tasks:
        step = time.perf_counter()
        results.setdefault("tasks", {}).update(_harness_results(scorer, config, manager, progress, work))
        results["timings"]["harness_s"] = round(time.perf_counter() - step, 3)
    if "tasks" in results:
        primaries = [r[r["primary"]] for r in results["tasks"].values() if r.get("in_macro_mean", True)]
        results["tasks"]["macro_mean"] = sum(primaries) / len(primaries) if primaries else None
    results["timings"]["total_s"] = round(time.perf_counter() - started, 3)
    if work is not None:
        results["work"] = work.as_dict()
    results["peak_memory"] = peak_memory(scorer.device)
    results["computed_in"] = {"device": str(scorer.device), "dtype": str(scorer.dtype).removeprefix("torch.")}  # what 'auto' chose
    results["versions"] = versions()
    if config.harness_tasks:  # lm-eval's task definitions and metrics are part of what the numbers mean
        import lm_eval

        results["versions"]["lm_eval"] = lm_eval.__version__
    return results


ACCURACIES = ("acc", "acc_norm", "exact_match")  # lm-eval metrics that enter the macro mean of accuracies
BOOKKEEPING = ("primary", "source", "in_macro_mean", "n", "num_fewshot")  # keys of an lm-eval task's result that are no metric


def table_metrics(task: str, metrics: dict) -> list[str]:
    """The names of the metrics that tables show for one task's result (results["tasks"][task]): for an
    lm-eval task every metric it reports but their stderr ('acc', 'acc_norm', 'word_perplexity',
    'exact_match,strict-match'); for a built-in task acc, and acc_norm too for HellaSwag."""
    if metrics.get("source") == "lm-eval":
        return [name for name in metrics if name not in BOOKKEEPING and not name.split(",")[0].endswith("_stderr")]
    return ["acc", "acc_norm"] if task == "hellaswag" else ["acc"]


_TASK_MANAGERS: dict = {}  # (include_path, its YAML files' sizes and times): lm-eval's TaskManager
_WARNED: set = set()  # those keys whose skipped files were named (warn_skipped_yamls)
_LIMITS_WARNED: set = set()  # (limit, count, task, where) said once per process: a sweep evaluates many times


def _warn_limit(limit: int | None, count: int, task: str, where: str = "") -> None:
    """A warning, once per process, that --limit asks for more than the `count` examples `task` has (the
    table's n says so too, but quietly)."""
    if limit is not None and limit > count and (limit, count, task, where) not in _LIMITS_WARNED:
        _LIMITS_WARNED.add((limit, count, task, where))
        log.warning("--limit %d is more than the %d examples of %s%s: all are evaluated", limit, count, task, where)


def _yaml_stamps(include_path: str | None) -> tuple:
    """(path, size, modification time in ns) of every .yaml file under include_path: a change to any of
    them (or a file added or removed) means a TaskManager indexed before is out of date."""
    if not include_path:
        return ()
    stamps = []
    for path in sorted(Path(include_path).rglob("*.yaml")):
        try:
            stat = path.stat()
        except OSError:  # removed meanwhile, or a broken link: lm-eval will say so when it reads the folder
            continue
        stamps.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


def offline_yaml_hint(option: str) -> str:
    """What to do when an lm-eval task's dataset cannot be downloaded, `option` being the command's
    include-path option (--include-path for streamprune eval, --include_path for lm-eval's command)."""
    return f"offline, write a task YAML over local files (dataset_path: json, with data_files) and pass its folder with {option}"


def _task_manager(config: EvalConfig, progress: bool = False):
    """lm-eval's TaskManager (with include_path), after checking that every task that is not built in
    is one of its tasks or groups: before anything is evaluated, so a typo costs no streaming pass.

    Building one indexes all of lm-eval's task YAMLs (14,690 in lm-eval 0.4.13: 8 to 12 s on a 2-core
    CPU), so it is built once per process for an include_path whose YAML files are unchanged
    (_yaml_stamps): a sweep's configurations, and eval --baseline's second model, reuse it.  lm-eval makes
    each evaluation's task objects anew from the index (simple_evaluate's get_task_dict).  When the
    tasks are all found, the files under include_path that lm-eval passed over are still named, in a
    warning, once per folder state: a task, group or tag one of them defines would be missing unnoticed.
    With progress, a line says the index is being built (lm-eval shows nothing for those seconds)."""
    from lm_eval.tasks import TaskManager

    key = (config.include_path, _yaml_stamps(config.include_path))
    manager = _TASK_MANAGERS.get(key)
    if manager is None:
        if progress:
            progress_bars.message("Indexing lm-eval's tasks (its task YAMLs" + (f" and {config.include_path}'s" if config.include_path else "")
                                  + "; about 10 s on a small CPU) ...")
        manager = TaskManager(include_path=config.include_path)
        _TASK_MANAGERS.clear()  # one index at a time: an older one is not needed again
        _TASK_MANAGERS[key] = manager
    known = set(manager.all_tasks)
    unknown = [t for t in config.harness_tasks if t not in known]
    if unknown:
        raise StreamPruneError(
            f"unknown task {unknown[0]!r}{did_you_mean(unknown[0], [*all_tasks(), *known])}: neither built in "
            f"({', '.join(all_tasks())}) nor an lm-eval task"
            + (f" (nor under {config.include_path}){skipped_yamls_note(config.include_path)}" if config.include_path
               else "; --include-path DIR adds task YAMLs")
        )
    if config.include_path and key not in _WARNED:
        _WARNED.add(key)
        warn_skipped_yamls(config.include_path)
    return manager


def warn_skipped_yamls(include_path: str) -> None:
    """A warning naming the files under include_path that lm-eval passes over (skipped_yamls_note), if any."""
    note = skipped_yamls_note(include_path)
    if note:
        log.warning("%s under %s: a task, group or tag defined there is not evaluated", note.removeprefix("; "), include_path)


def skipped_yamls_note(include_path: str) -> str:
    """'; lm-eval skipped FILE (why), ...' (the first three) for an unknown-task error, or '': the files
    under include_path that lm-eval 0.4.13 passes over without a word, a .yaml it cannot parse and a .yml
    (it reads **/*.yaml only, outside __pycache__ and .ipynb_checkpoints)."""
    import yaml

    class AnyTag(yaml.SafeLoader):  # lm-eval's own tags (!function) need its code; only the syntax is checked
        pass

    AnyTag.add_multi_constructor("", lambda loader, suffix, node: None)
    root, skipped = Path(include_path), []
    for path in sorted(root.rglob("*.y*ml")):
        parts = path.relative_to(root).parts
        if not path.is_file() or {"__pycache__", ".ipynb_checkpoints"} & set(parts):
            continue
        if path.suffix == ".yml":
            skipped.append(f"{path.relative_to(root)} (it reads only .yaml files)")
            continue
        try:
            yaml.load(path.read_text(encoding="utf-8", errors="replace"), Loader=AnyTag)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            skipped.append(f"{path.relative_to(root)} (a YAML error{where}: {getattr(exc, 'problem', None) or one_line(exc)})")
    return f"; lm-eval skipped {', '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}" if skipped else ""


class UnknownMetric(Exception):
    """A task's metric_list names a metric that neither lm-eval nor the HF evaluate library has."""


@contextlib.contextmanager
def unknown_metrics_refused():
    """For the length of the block, a task naming a metric found nowhere stops the evaluation while lm-eval
    builds the task (before any request is run) with UnknownMetric, whose one-line error names the task
    (errors.lm_eval_context) and lm-eval's metrics.  lm-eval 0.4.13 logs an error, drops the metric and
    evaluates on: a misspelt `acc` would cost the whole evaluation and leave another metric, or none, as
    the task's score.  Done through that log record, the one sign lm-eval gives (a filter on its logger,
    removed afterwards), since it lets nothing else out."""
    import logging

    from lm_eval.api.registry import metric_registry

    logger = logging.getLogger("lm_eval.api.registry")

    def refuse(record) -> bool:
        said = record.getMessage()
        if " not found in the evaluate library" in said:
            name = said.split(" not found in the evaluate library")[0]
            raise UnknownMetric(f"its metric_list names {name!r}, which is neither one of lm-eval's metrics "
                                f"({', '.join(sorted(metric_registry.keys()))}) nor in the HF evaluate library")
        return True

    logger.addFilter(refuse)
    try:
        yield
    finally:
        logger.removeFilter(refuse)


def _lm_eval_bars(enabled: bool):
    """For the length of the block, the bars lm-eval draws with tqdm itself (building a task's requests,
    tokenising, checking its request cache) are streamprune's (progress.libraries_bars): lm-eval 0.4.13
    has no switch for its request-building bar."""
    import lm_eval.api.model
    import lm_eval.api.task

    return progress_bars.libraries_bars((lm_eval.api.task, lm_eval.api.model), enabled, "Building requests")


def _harness_results(scorer: Scorer, config: EvalConfig, manager, progress: bool, work: Work | None = None) -> dict:
    """{task: its lm-eval metrics} for the tasks that are not built in (a group's subtasks each under its
    own name, beside the group's aggregate if lm-eval gives one), through lm_eval.simple_evaluate with
    StreamedLM on the model already open.  --limit is lm-eval's: the first N documents.  A metric of a
    filter other than lm-eval's 'none' is named 'metric,filter' (gsm8k's strict-match and flexible-extract).
    StreamedLM's count of the work done is added to `work`."""
    import lm_eval

    from .harness import StreamedLM

    lm = StreamedLM.from_opened(scorer.opened, batch_size=config.batch_size, progress=progress,
                                max_resident_tokens=config.max_resident_tokens, share_contexts=config.share_contexts)
    import datasets

    bars_were_off = datasets.are_progress_bars_disabled()
    if not progress or progress_bars.lines_only():  # preparing a task's split: no bar under --quiet, nor \r in a log
        datasets.disable_progress_bars()
    offline = Offline()
    try:
        # lm-eval prints a line to stdout when it bootstraps a metric's stderr; stdout is the results table's
        with _lm_eval_bars(progress), unknown_metrics_refused(), contextlib.redirect_stdout(sys.stderr), \
                datasets_from_cache_when_offline() as offline:
            output = lm_eval.simple_evaluate(model=lm, tasks=list(config.harness_tasks), task_manager=manager,
                                             num_fewshot=config.num_fewshot, limit=config.limit,
                                             **({} if config.seed is None else {name: config.seed for name in (
                                                 "random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")}))
    except ConnectionError as exc:  # datasets' "Couldn't reach ... on the Hub", offline or down
        why = one_line(exc) + (f"; {unreachable_note(offline.reason)}" if offline.reason else "")
        raise StreamPruneError(f"lm-eval could not load a task's dataset ({why}); {offline_yaml_hint('--include-path')}") from None
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
        if work is not None:
            work.add(lm.work)
    results = {}
    # a subtask enters the macro mean in place of its group only when the group has no accuracy of its own
    subtasks = output.get("group_subtasks", {})
    parents = {sub: group for group, subs in subtasks.items() for sub in subs}

    def documents(task: str) -> int | None:  # lm-eval counts a task's documents; a group's are its subtasks'
        if task in output.get("n-samples", {}):
            return output["n-samples"][task].get("effective")
        counts = [documents(sub) for sub in subtasks.get(task, ())]
        return sum(counts) if counts and None not in counts else None

    for task, counts in output.get("n-samples", {}).items():
        if isinstance(counts.get("original"), int):
            _warn_limit(config.limit, counts["original"], task)
    for task, values in output["results"].items():
        metrics = {}
        for key, value in values.items():
            metric, _, kept = key.partition(",")
            if kept and isinstance(value, (int, float)):
                metrics[metric if kept == "none" else f"{metric},{kept}"] = value
        names = [k for k in metrics if not k.split(",")[0].endswith("_stderr")]
        if not names:
            if task not in subtasks:  # a group without an aggregate of its own has none
                log.warning("lm-eval computed no metric for task %s: check the metric_list of its YAML (a metric lm-eval "
                            "knows, such as acc, exact_match or word_perplexity)", task)
            continue
        # the first of ACCURACIES it reports, under whichever filter (gsm8k's exact_match,strict-match)
        primary = next((name for accuracy in ACCURACIES for name in names if name.split(",")[0] == accuracy), names[0])
        group_scored = any(key.split(",")[0] in ACCURACIES for key in output["results"].get(parents.get(task), {}))
        results[task] = {**metrics, "primary": primary, "source": "lm-eval",
                         "in_macro_mean": primary.split(",")[0] in ACCURACIES and not group_scored,
                         "n": documents(task),
                         "num_fewshot": output.get("n-shot", {}).get(task)}
    return results


def metric_rows(results: dict) -> list[tuple[str, float]]:
    """(name, value) for the table: perplexity (and slices), then each task's metrics and the macro mean."""
    rows = []
    if "ppl" in results:
        ppl = results["ppl"]
        rows.append((f"ppl {Path(ppl['dataset']).name} ({ppl['windows']} x {ppl['seqlen']})", ppl["value"]))
        for number, value in enumerate(ppl["slices"], 1):
            rows.append((f"  slice {number}", value))
        if ppl["slices_mean"] is not None:
            rows.append(("  mean of slices", ppl["slices_mean"]))
    for name, metrics in results.get("tasks", {}).items():
        if name == "macro_mean":
            continue
        shots = f", {metrics['num_fewshot']}-shot" if metrics.get("num_fewshot") else ""
        source = "lm-eval, " if metrics.get("source") == "lm-eval" else ""
        # an accuracy left out of the macro mean is a group's subtask's: the group's own counts instead
        member = metrics.get("in_macro_mean") is False and str(metrics.get("primary", "")).split(",")[0] in ACCURACIES
        for metric in table_metrics(name, metrics):
            rows.append((f"{name} {metric} ({source}n={metrics['n']}{shots}{', in its group' if member else ''})", metrics[metric]))
    if results.get("tasks", {}).get("macro_mean") is not None:
        rows.append(("macro mean accuracy", results["tasks"]["macro_mean"]))
    return rows


def differences(results: dict, baseline: dict) -> dict:
    """This model's results minus the baseline's, for the JSON beside the table's difference column:
    {"ppl": {"value", "slices" (list), "slices_mean"}, "tasks": {task: {metric: difference}, "macro_mean"}}
    over what both have on the same footing: perplexity on the same text, windows and length; a task's
    metrics (those the table shows, table_metrics) where both evaluated the same number of examples with
    the same shots; the macro means wherever both have one, as the table shows them.  Perplexities are in
    their own units (lower is better), accuracies in [-1, 1]."""
    out: dict = {}
    ppl, base_ppl = results.get("ppl"), baseline.get("ppl")
    if ppl and base_ppl and all(ppl.get(k) == base_ppl.get(k) for k in ("dataset", "windows", "seqlen")):
        slices = [a - b for a, b in zip(ppl["slices"], base_ppl["slices"])] if len(ppl["slices"]) == len(base_ppl["slices"]) else []
        both = ppl.get("slices_mean") is not None and base_ppl.get("slices_mean") is not None
        out["ppl"] = {"value": ppl["value"] - base_ppl["value"], "slices": slices,
                      "slices_mean": ppl["slices_mean"] - base_ppl["slices_mean"] if both else None}
    tasks, base_tasks = results.get("tasks", {}), baseline.get("tasks", {})
    differing: dict = {}
    for name, metrics in tasks.items():
        base = base_tasks.get(name)
        if name == "macro_mean" or not isinstance(base, dict) or (metrics.get("n"), metrics.get("num_fewshot")) != (base.get("n"), base.get("num_fewshot")):
            continue
        differing[name] = {m: metrics[m] - base[m] for m in table_metrics(name, metrics)
                           if isinstance(base.get(m), (int, float)) and isinstance(metrics.get(m), (int, float))}
    if tasks.get("macro_mean") is not None and base_tasks.get("macro_mean") is not None:  # as the table's row
        differing["macro_mean"] = tasks["macro_mean"] - base_tasks["macro_mean"]
    if differing:
        out["tasks"] = differing
    return out


def format_table(results: dict, baseline: dict | None = None) -> str:
    """The metrics as an aligned text table; with a baseline: baseline, this model and the difference."""
    rows = metric_rows(results)
    if not rows:
        return "(no metrics)"
    if baseline is None:
        table = [[name, f"{value:.4f}"] for name, value in rows]
    else:
        base = dict(metric_rows(baseline))
        table = [["", "baseline", "model", "difference"]]
        for name, value in rows:
            reference = base.get(name)
            table.append([name, "", f"{value:.4f}", ""] if reference is None
                         else [name, f"{reference:.4f}", f"{value:.4f}", f"{value - reference:+.4f}"])
    # numbers right-aligned in columns of 12, wider (two spaces apart at least) where a value needs it
    widths = [max(len(row[0]) for row in table) + 2] + [max(12, max(len(row[c]) for row in table) + 2)
                                                         for c in range(1, len(table[0]))]
    return "\n".join((row[0].ljust(widths[0]) + "".join(cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))).rstrip()
                     for row in table)
