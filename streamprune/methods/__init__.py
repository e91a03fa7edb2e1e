"""Pruning methods: one object per method, in one registry.

A method says which statistics of each linear layer's inputs it needs (stats.STATISTICS), how it
decides the keep-mask of a weight and over which comparison group (the post-condition before a block is
written checks that group), whether it changes the weights it keeps, and its own options with their
defaults.  The engine knows nothing else of it.

A new method is one file in this folder that defines `METHODS = [...]`: every module of the package is
imported and its methods registered by name.  `--method`, the method options of `streamprune prune` and
`streamprune methods` (the README's table) come from here.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import StreamPruneError

if TYPE_CHECKING:
    from ..config import PruneConfig
    from ..stats import InputStatistics


@dataclass(frozen=True)
class Option:
    """One option of a method: `--name` on the command line (underscores as dashes), a keyword of
    streamprune.prune(), a key of the manifest's config.  A number (checked against [low, high]), a list
    of numbers (`numbers`: '0,0.5,1' on the command line, each checked), or one of `choices` (a word)."""

    name: str
    default: object
    help: str
    low: float | None = None
    high: float | None = None
    integer: bool = False
    open_high: bool = False  # high itself is not allowed
    numbers: bool = False  # a list of numbers
    choices: tuple[str, ...] = ()  # a word, one of these

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value):
        """The value as the option's type (a number, a tuple of numbers, or a word); StreamPruneError if it
        is not one or out of range."""
        if self.choices:
            if value not in self.choices:
                raise StreamPruneError(f"{self.flag} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        if self.numbers:
            items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
            checked = tuple(dict.fromkeys(self._number(item) for item in items if str(item).strip()))
            if not checked:
                raise StreamPruneError(f"{self.flag} needs at least one value, got {value!r}")
            return checked
        return self._number(value)

    def _number(self, value):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise StreamPruneError(f"{self.flag} must be {'numbers' if self.numbers else 'a number'}, got {value!r}") from None
        if self.integer:
            if number != int(number):
                raise StreamPruneError(f"{self.flag} must be a whole number, got {value!r}")
            number = int(number)
        too_high = self.high is not None and (number > self.high or (self.open_high and number == self.high))
        if (self.low is not None and number < self.low) or too_high or not math.isfinite(number):
            closing = ")" if self.open_high else "]"
            bounds = f"[{_bound(self.low)}, {_bound(self.high)}{closing}" if self.high is not None else f"at least {_bound(self.low)}"
            raise StreamPruneError(f"{self.flag} must be {'in ' if self.high is not None else ''}{bounds}, got {value}")
        return number

    def text(self, value) -> str:
        """The value as written in names, labels and messages: '0.5', '0,0.5,1', 'both'."""
        return option_text(value)

    def as_json(self, value):
        """The value as the manifest's config holds it (a list for numbers), so that a resumed run's
        options compare equal to those read back."""
        return list(value) if isinstance(value, tuple) else value


def _bound(number: float) -> str:
    """A range's end as a message writes it: whole numbers in full (1048576, not 1.04858e+06)."""
    return str(int(number)) if float(number).is_integer() and abs(number) < 1e15 else f"{number:g}"


def option_text(value) -> str:
    """An option's value as written in names, labels and messages: '0.5', '0,0.5,1', 'both'."""
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" for v in value)
    return value if isinstance(value, str) else f"{value:g}"


@dataclass(frozen=True)
class Groups:
    """The comparison groups a method ranks weights within, for its sparsity promise.

    A group is `columns` consecutive inputs of one output row, or, with all_rows, of every row at once
    (the last group of a row may be narrower).  It must hold at least `n` zeros, or with n None at least
    floor(sparsity * its size).
    """

    columns: int
    all_rows: bool = False
    n: int | None = None


@dataclass
class Decision:
    """What a method decided for one weight (out_features, in_features): the keep-mask (bool, True =
    keep), and for methods that change the kept weights the new weight (float32 or wider, pruned
    entries exactly 0), else None."""

    keep: torch.Tensor
    weight: torch.Tensor | None = None


@dataclass
class BlockView:
    """What a method that chooses per block (Method.choose) may use of the block at work: its linears
    (name -> nn.Linear, weights in the compute dtype, changeable in place) and its outputs on a seeded
    share of the calibration windows (outputs(rows): tensor (rows, seqlen, hidden) in float32, computed
    with the weights as they are at the call)."""

    index: int
    linears: dict
    outputs: Callable[[int], torch.Tensor]


class Method:
    """A pruning method.  Subclasses set the attributes and implement decide() and groups()."""

    name: str = ""
    summary: str = ""  # one line: what it scores or minimises (CLI help, README table)
    source: str = ""  # the paper, and the equation or algorithm
    order: int = 100  # place in listings (--method, the README table); then by file name
    group: str = "output row"  # the comparison group of unstructured pruning, in words (README table)
    needs: frozenset = frozenset()  # statistics (stats.STATISTICS); empty: no calibration passes at all
    updates_weights: bool = False
    options: tuple[Option, ...] = ()

    def decide(self, weight: torch.Tensor, stats: "InputStatistics | None", config: "PruneConfig", name: str) -> Decision:
        """The decision for `weight` (the linear's weight in the compute dtype, not changed here) from
        the statistics of its inputs (None when `needs` is empty).  `name` is for messages."""
        raise NotImplementedError

    def groups(self, config: "PruneConfig", in_features: int) -> Groups:
        """The comparison groups of this method under `config` (unstructured or N:M)."""
        raise NotImplementedError

    chooses_per_block = False  # choose() picks another configuration for each block

    def choose(self, view: BlockView, statistics: dict, config: "PruneConfig") -> tuple["PruneConfig", dict]:
        """For methods with chooses_per_block: the configuration block `view.index` is pruned with (its
        decide() and groups() are used) and a record of the choice for the manifest.  The block's weights
        must be as they were when it returns."""
        raise NotImplementedError

    def choices_summary(self, choices: dict) -> str:
        """The per-block choices of a run (manifest `block_choices`) in a few lines, for the CLI."""
        return ""

    @property
    def defines_outlier_scores(self) -> bool:
        return type(self).outlier_scores is not Method.outlier_scores

    @property
    def outlier_needs(self) -> frozenset:
        """The statistics outlier_scores needs (the first pass of --budgets owl); by default `needs`."""
        return self.needs

    def outlier_scores(self, weight: torch.Tensor, stats: "InputStatistics | None", config: "PruneConfig") -> torch.Tensor:
        """The scores OWL counts the outliers of (budgets.py): shape of `weight`, float32 or wider, from
        the statistics of outlier_needs.  Raises StreamPruneError for a method that defines none."""
        raise StreamPruneError(f"--budgets owl needs a score to count outliers of, and {self.name} defines none")

    def check_config(self, config: "PruneConfig", in_features: int) -> None:
        """Refuses (StreamPruneError) a configuration this method cannot honour for a weight of
        `in_features` inputs; nothing by default."""


def _discover() -> dict[str, Method]:
    found: list[Method] = []
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        found += importlib.import_module(f"{__name__}.{module}").METHODS
    names = [method.name for method in found]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two methods share a name: {sorted(n for n in names if names.count(n) > 1)[0]!r}")
    return {method.name: method for method in sorted(found, key=lambda m: m.order)}  # stable: file order within


METHODS: dict[str, Method] = _discover()


def get_method(name: str) -> Method:
    """The registered method called `name`; StreamPruneError listing the known ones otherwise."""
    if name not in METHODS:
        raise StreamPruneError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def all_options(extra: tuple[Option, ...] = ()) -> dict[str, tuple[Option, list[str]]]:
    """Every method option by name, with the methods that take it (an option shared by several methods
    must mean the same in each: the first one declared is kept)."""
    options: dict[str, tuple[Option, list[str]]] = {}
    for method in METHODS.values():
        for option in method.options:
            options.setdefault(option.name, (option, []))[1].append(method.name)
    for option in extra:
        options.setdefault(option.name, (option, []))
    return options
