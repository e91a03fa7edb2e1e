"""The exception types users see: each message says what is wrong and what to do."""


def one_line(text) -> str:
    """A message with its whitespace (newlines included) collapsed: errors are printed on one line."""
    return " ".join(str(text).split())


def lm_eval_context(exc: BaseException) -> str:
    """Where in lm-eval an exception arose, for its one-line error: ' (lm-eval task NAME)' when a task's own
    code raised it (its Jinja prompt template, its dataset loading), which lm-eval's message does not say
    (a template's "'questoin' is undefined" among three tasks), and for a missing file, that a task YAML's
    relative data paths are read from the folder the command runs in.  '' when no task is involved."""
    name, tb = None, exc.__traceback__
    while tb is not None:  # the innermost task object among the frames' `self`
        owner = tb.tb_frame.f_locals.get("self")
        if type(owner).__module__.startswith("lm_eval.") and isinstance(getattr(getattr(owner, "config", None), "task", None), str):
            name = owner.config.task
        tb = tb.tb_next
    if name is None:
        return ""
    hint = "; relative paths in a task YAML are read from the folder you run in" if isinstance(exc, FileNotFoundError) else ""
    return f" (lm-eval task {name}{hint})"


class StreamPruneError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class Interrupted(StreamPruneError):
    """The user asked to stop (Ctrl-C, SIGTERM); the run stopped at a safe point and can be resumed."""

    exit_code = 130


class NumericalError(StreamPruneError):
    """One configuration's numbers went wrong: activations overflowed the compute dtype, a log-likelihood
    is not finite, or a pruned tensor does not meet its sparsity.  Nothing is marked complete; a sweep
    records the configuration as failed, with this message, and goes on with the next one."""
