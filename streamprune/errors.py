"""The exception types users see: each message says what is wrong and what to do."""


def one_line(text) -> str:
    """A message with its whitespace (newlines included) collapsed: errors are printed on one line."""
    return " ".join(str(text).split())


def lm_eval_context(exc: BaseException) -> str:
    """Where in lm-eval an exception arose, for its one-line error: ' (lm-eval task NAME)' when a task's own
    code raised it (its Jinja prompt template, its dataset loading, its YAML's keys), which lm-eval's
    message does not say (a template's "'questoin' is undefined" among three tasks), with what to change
    where lm-eval's message does not say it either: for a missing file, that a task YAML's relative data
    paths are read from the folder the command runs in; for an unknown key, the YAML file; for a split
    the dataset lacks (a bare KeyError), which of its splits (the innermost *_docs call: test_split
    where lm-eval's fewshot_docs fell back to test_docs) and the splits it has; for a metric given an
    option its function does not take (a TypeError in process_results), that; for more few-shot
    examples than its few-shot split holds, to ask for fewer; for an answer choice that is empty
    (lm-eval 0.4.13 reads its first character while building the task), to give every choice text.
    '' when no task is involved."""
    name, path, splits, functions, tb = None, None, None, set(), exc.__traceback__
    frames = []
    while tb is not None:  # the innermost task object among the frames' `self`, else the task lm-eval was building
        frame = tb.tb_frame
        owner, entry = frame.f_locals.get("self"), frame.f_locals.get("entry")
        functions.add(frame.f_code.co_name)
        if type(owner).__module__.startswith("lm_eval.") and isinstance(getattr(getattr(owner, "config", None), "task", None), str):
            name = owner.config.task
        elif name is None and type(entry).__module__.startswith("lm_eval.") and isinstance(getattr(entry, "name", None), str):
            name, path = entry.name, getattr(entry, "yaml_path", None)
        if type(owner).__name__ == "DatasetDict" and type(owner).__module__.startswith("datasets."):
            splits = list(owner.keys())
        frames.append(frame)
        tb = tb.tb_next
    if name is None:
        return ""
    text, hint = str(exc), ""
    if isinstance(exc, FileNotFoundError):
        hint = "; relative paths in a task YAML are read from the folder you run in"
    elif isinstance(exc, TypeError) and "TaskConfig" in text and "unexpected keyword argument" in text:
        hint = f"; its YAML{f' {path}' if path else ''} has a key lm-eval does not know: misspelt?"
    elif isinstance(exc, KeyError) and splits is not None:
        # lm-eval's fewshot_docs falls back to test_docs when the task names no fewshot_split
        docs = next((f for f in reversed(frames) if f.f_code.co_name.endswith("_docs")), None)
        split = docs.f_code.co_name.removesuffix("_docs") if docs is not None else None
        which = f"its {split}_split" if split in ("fewshot", "test", "validation", "training") else "a split its YAML names"
        hint = f"; {which} is not one of its dataset's: {', '.join(splits)}"
    elif "fewshot samples requested exceeds" in text or ("sample" in functions and "larger than population" in text):
        hint = "; it asks for more few-shot examples than its few-shot split holds: ask for fewer (num_fewshot in its YAML, or the command's option)"
    elif isinstance(exc, TypeError) and "process_results" in functions and "positional argument" in text:
        hint = "; its metric_list gives a metric an option the metric does not take (lm-eval hands a metric's options to its function)"
    elif isinstance(exc, IndexError) and frames[-1].f_locals.get("choice") == "" and "check_choices" in frames[-1].f_locals:
        hint = "; an answer choice of its first document is empty (doc_to_choice), which lm-eval cannot build a task with: give every choice some text"
    return f" (lm-eval task {name}{hint})"


class StreamPruneError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class Interrupted(StreamPruneError):
    """The user asked to stop (Ctrl-C, SIGTERM); the run stopped at a safe point and can be resumed."""

    exit_code = 130


def did_you_mean(name: str, names, cutoff: float = 0.8) -> str:
    """' (did you mean 'X'?)' for the one of `names` closest to a misspelt `name` (difflib's ratio at
    least `cutoff`), else ''."""
    import difflib

    close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def rerun_hint(starts_over=()) -> str:
    """How to resume a stopped prune or sweep: the same command, or, where it gave flags that would
    start it over (--overwrite, --no-resume: `starts_over`), the same command without them."""
    return f"rerun without {' and '.join(starts_over)} to resume" if starts_over else "rerun the same command to resume"


class NumericalError(StreamPruneError):
    """One configuration's numbers went wrong: activations overflowed the compute dtype, a log-likelihood
    is not finite, or a pruned tensor does not meet its sparsity.  Nothing is marked complete; a sweep
    records the configuration as failed, with this message, and goes on with the next one."""
