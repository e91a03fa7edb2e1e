"""Every option of a pruning run, validated once, and written into the run manifest."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .errors import StreamPruneError
from .scoring import METHODS

STAT_NORMS = ("mean", "sum")
DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")


@dataclass(frozen=True)
class PruneConfig:
    method: str = "en-modified"
    alpha: float = 0.5
    sparsity: float = 0.5
    pattern: str | None = None  # "N:M" semi-structured; overrides sparsity with N/M
    calib: str = "wikitext103"
    nsamples: int = 128
    calib_mult: int = 1  # windows drawn = nsamples * calib_mult
    seqlen: int = 2048
    seed: int = 0
    stat_norm: str = "mean"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 4

    def __post_init__(self):
        if self.method not in METHODS:
            raise StreamPruneError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise StreamPruneError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.pattern is None and not 0.0 <= self.sparsity < 1.0:
            raise StreamPruneError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            object.__setattr__(self, "sparsity", n / m)
        for name in ("nsamples", "calib_mult", "seqlen", "batch_size"):
            if getattr(self, name) < 1:
                raise StreamPruneError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.stat_norm not in STAT_NORMS:
            raise StreamPruneError(f"stat-norm must be one of {', '.join(STAT_NORMS)}, got {self.stat_norm!r}")
        if self.dtype not in DTYPES:
            raise StreamPruneError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def nwindows(self) -> int:
        return self.nsamples * self.calib_mult

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PruneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): zero the N lowest scores in every group of M consecutive inputs."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not match:
        raise StreamPruneError(f"pattern must look like N:M (for example 2:4), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise StreamPruneError(f"pattern {pattern!r} needs 0 < N < M")
    return n, m
