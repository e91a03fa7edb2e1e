"""Progress bars that suit where stderr goes: redrawn in place on a terminal, plain lines in a log.

On a terminal, tqdm's own bar.  On anything else (a log file, CI, `nohup`) a bar redrawn with carriage
returns leaves its residue in the file, and a later `Error:` would land on the same line; there each bar
prints whole lines instead: one when it starts, at most one a minute while it runs, and one when it ends
if it moved since its last line (also for bars a terminal clears, `leave=False`: a log that showed only
`Scoring: 0/31 block` would leave a reader asking whether it ever finished).  Messages go through
`message()`, which clears and redraws bars on a terminal (tqdm.write), so `Warning:` and `Error:` always
start their own line.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

from tqdm.std import tqdm

with warnings.catch_warnings():  # in Jupyter it warns that its notebook support is experimental
    warnings.simplefilter("ignore")
    from tqdm.autonotebook import tqdm as auto_tqdm  # the notebook widget inside Jupyter, else tqdm.std's

LOG_INTERVAL_S = 60.0  # at most one progress line a minute in a log


def stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class _LogLines(tqdm):
    """A tqdm that writes whole lines, never a carriage return: for stderr that is not a terminal."""

    def __init__(self, *args, leave: bool = True, **kwargs):  # leave: a terminal's matter; a log keeps every line
        self.final_line = True  # close_all turns it off: before an error the state reached says nothing
        self._last_state = None  # (description, count) of the last line: a line says something new or nothing
        kwargs.update(mininterval=LOG_INTERVAL_S, maxinterval=float("inf"), miniters=1, dynamic_ncols=False, ncols=None)
        kwargs.setdefault("bar_format", "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]")
        super().__init__(*args, leave=False, **kwargs)

    def display(self, msg=None, pos=None):
        if msg == "":  # tqdm clearing the bar: nothing to clear in a log
            return False
        if (self.desc, self.n) == self._last_state:
            return False
        self._last_state = (self.desc, self.n)
        self.fp.write(f"{self.__str__() if msg is None else msg}\n")
        self.fp.flush()
        return True

    def clear(self, nolock=False):
        pass

    def __exit__(self, exc_type, exc_value, traceback):
        if exc_type is not None:  # stopped by an error, which says what matters
            self.final_line = False
        return super().__exit__(exc_type, exc_value, traceback)

    def close(self):
        if not self.disable and self.final_line:  # its final state, unless its last line already said it
            self.display()
        super().close()


def lines_only() -> bool:
    """Whether bars print whole lines (stderr is neither a terminal nor a notebook): libraries' own bars,
    drawn with carriage returns, are then better off."""
    return auto_tqdm is tqdm and not stderr_is_terminal()


def bar(*, total: int | None, desc: str, unit: str, enabled: bool = True, leave: bool = True, initial: int = 0,
        iterable=None) -> tqdm:
    """A progress bar on stderr: tqdm's on a terminal (or a notebook's), whole lines otherwise; a disabled
    one if not enabled.  `initial` counts work an earlier session did: shown as done, but left out of the
    rate and ETA (tqdm's `initial`), which an `update(initial)` at the start would inflate.  With an
    iterable, iterating the bar yields its items and counts them, as tqdm(iterable)."""
    if auto_tqdm is not tqdm:  # a notebook: its widget
        cls = auto_tqdm
    else:
        cls = _LogLines if lines_only() else tqdm
    return cls(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=leave, file=sys.stderr, initial=initial)


@contextlib.contextmanager
def libraries_bars(modules, enabled: bool, default_desc: str, unit: str = "it"):
    """For the length of the block, the bars that `modules` draw with tqdm itself (no switch of theirs
    turns them off) are streamprune's `bar`s: none when not enabled, whole lines rather than carriage
    returns in a log.  The name `tqdm` each module looks up is pointed here and back afterwards; a module
    without that name is left alone.  default_desc names a bar the library gives no description."""

    def borrowed(iterable=None, desc=None, total=None, disable=False, **_):  # total None: tqdm takes len(iterable)
        return bar(iterable=iterable, total=total, desc=desc or default_desc, unit=unit, enabled=enabled and not disable, leave=False)

    replaced = [(module, module.tqdm) for module in modules if hasattr(module, "tqdm")]
    for module, _ in replaced:
        module.tqdm = borrowed
    try:
        yield
    finally:
        for module, original in replaced:
            module.tqdm = original


def message(line: str) -> None:
    """One line on stderr that starts on a line of its own, with any bar on the terminal redrawn below it."""
    if stderr_is_terminal():
        tqdm.write(line, file=sys.stderr)
    else:
        sys.stderr.write(f"{line}\n")
        sys.stderr.flush()


def close_all() -> None:
    """Closes every bar still open (a terminal's bar line is cleared; in a log, with no final line), so that
    an error prints on its own line."""
    for instance in list(getattr(tqdm, "_instances", ())):
        instance.final_line = False
        instance.close()
