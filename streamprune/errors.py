"""The exception types users see: each message says what is wrong and what to do."""


def one_line(text) -> str:
    """A message with its whitespace (newlines included) collapsed: errors are printed on one line."""
    return " ".join(str(text).split())


class StreamPruneError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class Interrupted(StreamPruneError):
    """The user asked to stop (Ctrl-C, SIGTERM); the run stopped at a safe point and can be resumed."""

    exit_code = 130


class NumericalError(StreamPruneError):
    """One configuration's numbers went wrong: activations overflowed the compute dtype, a log-likelihood
    is not finite, or a pruned tensor does not meet its sparsity.  Nothing is marked complete; a sweep
    records the configuration as failed, with this message, and goes on with the next one."""
