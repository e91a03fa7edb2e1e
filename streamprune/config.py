"""Every option of a pruning run, validated once, and written into the run manifest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import StreamPruneError, did_you_mean
from .masking import parse_pattern

STAT_NORMS = ("mean", "sum")
DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")

__all__ = ["DTYPES", "STAT_NORMS", "PruneConfig", "parse_pattern"]


@dataclass(frozen=True)
class PruneConfig:
    """A pruning run's options.  `options` holds the method's own options (methods/; with reconstruct
    also the OBS update's, obs.py) as (name, value) pairs, every one filled in with its default;
    PruneConfig.of(**values) takes them as keywords like the other fields (alpha=0.25)."""

    method: str = "en-modified"
    sparsity: float = 0.5
    pattern: str | None = None  # "N:M" semi-structured; overrides sparsity with N/M
    reconstruct: bool = False  # update the kept weights of a mask-only method (OBS, the mask held)
    budgets: str = "uniform"  # per-block sparsities: uniform, or owl (budgets.py)
    calib: str = "wikitext103"
    nsamples: int = 128
    calib_mult: int = 1  # windows drawn = nsamples * calib_mult
    seqlen: int = 2048
    seed: int = 0
    stat_norm: str = "mean"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 4
    options: tuple = ()

    def __post_init__(self):
        from .methods import get_method

        method = get_method(self.method)
        if self.reconstruct and method.updates_weights:
            raise StreamPruneError(f"{self.method} updates the kept weights itself; --reconstruct is for mask-only methods")
        if self.pattern is None and not 0.0 <= self.sparsity < 1.0:
            raise StreamPruneError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            object.__setattr__(self, "sparsity", n / m)
        from .budgets import BUDGETS

        if self.budgets not in BUDGETS:
            raise StreamPruneError(f"--budgets must be one of {', '.join(BUDGETS)}, got {self.budgets!r}")
        if self.budgets == "owl" and self.pattern is not None:
            raise StreamPruneError("--budgets owl gives each block its own sparsity; an N:M pattern has one (N/M): use --sparsity")
        if self.budgets == "owl" and not method.defines_outlier_scores:
            raise StreamPruneError(f"--budgets owl counts outliers of the method's score, and {self.method} has no single score; use another method")
        for name in ("nsamples", "calib_mult", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise StreamPruneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.stat_norm not in STAT_NORMS:
            raise StreamPruneError(f"--stat-norm must be one of {', '.join(STAT_NORMS)}, got {self.stat_norm!r}")
        if self.dtype not in DTYPES:
            raise StreamPruneError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        allowed = {option.name: option for option in self.allowed_options()}
        given = dict(self.options)
        unknown = [name for name in given if name not in allowed]
        if unknown:
            from .obs import OPTIONS

            takes = ", ".join(option.flag for option in allowed.values()) or "no options"
            from .budgets import OPTIONS as OWL_OPTIONS

            hint = " (it is an option of --reconstruct)" if unknown[0] in {o.name for o in OPTIONS} else ""
            hint = " (it is an option of --budgets owl)" if unknown[0] in {o.name for o in OWL_OPTIONS} else hint
            raise StreamPruneError(f"--{unknown[0].replace('_', '-')} does not apply to {self.method}, which takes {takes}{hint}")
        values = {name: option.check(given.get(name, option.default)) for name, option in allowed.items()}
        object.__setattr__(self, "options", tuple(values.items()))
        if self.budgets == "owl":  # refused now rather than after the first pass: budgets lie within s +- 2 lambda
            lam = values["owl_lambda"]
            if self.sparsity + 2 * lam >= 1 or self.sparsity - 2 * lam < 0:
                raise StreamPruneError(
                    f"--owl-lambda {lam:g} with --sparsity {self.sparsity:g} could give a block a sparsity outside [0, 1) "
                    f"(the budgets lie within sparsity +- 2 lambda); lower --owl-lambda below {min(1 - self.sparsity, self.sparsity) / 2:g}"
                )

    def allowed_options(self):
        """The Option objects this configuration takes: its method's, the OBS update's with reconstruct,
        OWL's with budgets owl."""
        from .methods import get_method
        from .obs import OPTIONS

        from .budgets import OPTIONS as OWL_OPTIONS

        options = list(get_method(self.method).options)
        if self.reconstruct:
            options += [option for option in OPTIONS if option not in options]
        if self.budgets == "owl":
            options += list(OWL_OPTIONS)
        return options

    @property
    def option_values(self) -> dict:
        return dict(self.options)

    @property
    def statistics(self) -> frozenset:
        """The statistics of the linears' inputs this run gathers (stats.STATISTICS); none: no forward passes."""
        from .methods import get_method

        return get_method(self.method).needs | ({"gram"} if self.reconstruct else frozenset())

    @property
    def nwindows(self) -> int:
        return self.nsamples * self.calib_mult

    def to_dict(self) -> dict:
        """Every field, with the method's options as keys of their own (alpha, percdamp, ...)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**values, **{name: list(v) if isinstance(v, tuple) else v for name, v in self.options}}

    @classmethod
    def of(cls, **values) -> "PruneConfig":
        """A config from keywords: the fields, and the method's options by name (alpha=0.25).  Raises
        StreamPruneError for a keyword that is neither a field nor any method's, the OBS update's or
        OWL's option (a misspelling: 'sparsty'), naming the closest name."""
        from .budgets import OPTIONS as OWL_OPTIONS
        from .methods import METHODS
        from .obs import OPTIONS

        names = {f.name for f in dataclasses.fields(cls)} - {"options"}
        known = names | {o.name for o in OPTIONS} | {o.name for o in OWL_OPTIONS} | {o.name for m in METHODS.values() for o in m.options}
        for name in values:
            if name not in known:
                raise StreamPruneError(f"unknown argument {name!r}{did_you_mean(name, known, cutoff=0.7)}: "
                                       f"neither a pruning setting ({', '.join(sorted(names))}) nor a method's option")
        options = tuple((k, v) for k, v in values.items() if k not in names)
        return cls(**{k: v for k, v in values.items() if k in names}, options=options)
