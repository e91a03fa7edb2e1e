"""The one exception type users see: its message says what is wrong and what to do."""


class StreamPruneError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class Interrupted(StreamPruneError):
    """The user asked to stop (Ctrl-C, SIGTERM); the run stopped at a safe point and can be resumed."""

    exit_code = 130
