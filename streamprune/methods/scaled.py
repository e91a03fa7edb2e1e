"""Magnitude, Wanda and the two Elastic-Net Wanda geometries: |W| times a per-input scale, ranked per row.

For a linear layer y = x W^T, W has shape (out_features, in_features) and feature j of the input x is
the j-th column of W.  Over the calibration tokens t = 1..T the statistics are

    l1_j = sum_t |x_tj|        l2sq_j = sum_t x_tj^2        (both divided by T with --stat-norm mean)

and every method here scores W_ij as |W_ij| * scale_j:

    magnitude     1
    wanda         sqrt(l2sq_j)                                     ||X_j||_2  (Sun et al. 2023, eq. 1)
    en-original   a * l1_j + (1 - a) * l2sq_j                      a ||X_j||_1 + (1 - a) ||X_j||_2^2
    en-modified   a * l1_j + (1 - a) * sqrt(l2sq_j)                a ||X_j||_1 + (1 - a) ||X_j||_2

(the last two: "LLM Pruning with Elastic Net Enhanced Wanda Strategy", FLAIRS 2026), so en-modified at
a = 0 is wanda and the two geometries coincide at a = 1.  The comparison group is the output row (Wanda's
choice): each row loses floor(sparsity * in_features) entries, or N of every M consecutive inputs.  Kept
weights are not changed.  Another method of this shape is one more ScaledMagnitude in its own file.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import checks, masking
from ..config import parse_pattern
from ..errors import NumericalError
from ..masking import n_m_mask, row_mask
from ..stats import ActivationNorms
from . import Decision, Groups, Method, Option

ALPHA = Option("alpha", 0.5, "Elastic-net mix a in [0, 1]: the share of the L1 norm.", low=0.0, high=1.0)


def scores(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|W_ij| * scale_j, shape (out_features, in_features), in float32 (float64 for float64 weights)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return weight.detach().abs().to(dtype) * scale.to(device=weight.device, dtype=dtype)


def _finite_scores(weight_rows: torch.Tensor, scale: torch.Tensor, name: str) -> torch.Tensor:
    """Scores of some rows that are all finite: in float32 where the products fit, else in float64.

    Weights and statistics are finite by now (checked when read and after the statistics pass), so a
    non-finite float32 score is a product beyond float32's range (activations near 1e19 with
    --stat-norm sum); float64 holds it.  Raises NumericalError if even float64 does not.
    """
    chunk_scores = scores(weight_rows, scale)
    if not checks.ENABLED or bool(torch.isfinite(chunk_scores.sum())):  # one reduction: NaN and inf propagate
        return chunk_scores
    if bool(torch.isfinite(chunk_scores).all()):  # finite, only their sum overflowed
        return chunk_scores
    chunk_scores = scores(weight_rows.double(), scale)
    if not bool(torch.isfinite(chunk_scores).all()):
        raise NumericalError(f"the scores of {name} are not finite even in float64; the statistics are out of range")
    return chunk_scores


def keep_mask(weight: torch.Tensor, scale: torch.Tensor, sparsity: float, pattern: str | None, name: str = "weight") -> torch.Tensor:
    """The keep-mask (True = keep) of a weight (out_features, in_features) scored |W| * scale, per row
    (or N:M), ROW_CHUNK rows at a time.  Raises NumericalError for scores that are not finite in float64
    (never handed to the selection)."""
    keep = torch.empty(weight.shape, dtype=torch.bool, device=weight.device)
    step = masking.ROW_CHUNK
    for start in range(0, weight.shape[0], step):
        chunk_scores = _finite_scores(weight[start : start + step], scale, name)
        if pattern:
            keep[start : start + step] = n_m_mask(chunk_scores, *parse_pattern(pattern))
        else:
            keep[start : start + step] = row_mask(chunk_scores, sparsity)
    return keep


class ScaledMagnitude(Method):
    """Scores |W_ij| * scale_j with scale a function of the input norms (and the method's options)."""

    updates_weights = False
    order = 0

    def __init__(self, name: str, summary: str, source: str, scale: Callable, options: tuple[Option, ...] = (), needs=("norms",)):
        self.name, self.summary, self.source, self.options = name, summary, source, options
        self._scale = scale
        self.needs = frozenset(needs)

    def scale(self, norms: ActivationNorms | None, options: dict) -> torch.Tensor:
        """scale_j (float64, in_features, or a scalar for magnitude) from the input norms."""
        return self._scale(norms, options)

    def decide(self, weight, stats, config, name) -> Decision:
        norms = stats.norms(config.stat_norm) if stats is not None and "norms" in self.needs else None
        return Decision(keep_mask(weight, self.scale(norms, config.option_values), config.sparsity, config.pattern, name))

    def groups(self, config, in_features: int) -> Groups:
        if config.pattern:
            n, m = parse_pattern(config.pattern)
            return Groups(columns=m, n=n)
        return Groups(columns=in_features)

    def outlier_scores(self, weight, stats, config) -> torch.Tensor:
        norms = stats.norms(config.stat_norm) if stats is not None and "norms" in self.needs else None
        return _finite_scores(weight, self.scale(norms, config.option_values), self.name)


METHODS = [
    ScaledMagnitude("magnitude", "|W|; no calibration data", "Han et al. 2015", lambda norms, o: torch.ones((), dtype=torch.float64), needs=()),
    ScaledMagnitude("wanda", "|W| L2", "Sun et al. 2023, eq. 1", lambda norms, o: norms.l2sq.sqrt()),
    ScaledMagnitude(
        "en-original", "|W| (a L1 + (1-a) L2^2)", "FLAIRS 2026, EN-Original",
        lambda norms, o: o["alpha"] * norms.l1 + (1.0 - o["alpha"]) * norms.l2sq, options=(ALPHA,),
    ),
    ScaledMagnitude(
        "en-modified", "|W| (a L1 + (1-a) L2)", "FLAIRS 2026, EN-Modified",
        lambda norms, o: o["alpha"] * norms.l1 + (1.0 - o["alpha"]) * norms.l2sq.sqrt(), options=(ALPHA,),
    ),
]
