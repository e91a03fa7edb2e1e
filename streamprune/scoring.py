"""Importance scores: pure functions of |W| and per-input-feature activation norms.

For a linear layer y = x W^T, W has shape (out_features, in_features) and feature j of the input x is
the j-th column of W.  Over the calibration tokens t = 1..T the statistics are

    l1_j = sum_t |x_tj|        l2sq_j = sum_t x_tj^2        (both divided by T with --stat-norm mean)

and every method scores W_ij as |W_ij| * scale_j:

    magnitude     1
    wanda         sqrt(l2sq_j)                                     ||X_j||_2
    en-original   a * l1_j + (1 - a) * l2sq_j                      a ||X_j||_1 + (1 - a) ||X_j||_2^2
    en-modified   a * l1_j + (1 - a) * sqrt(l2sq_j)                a ||X_j||_1 + (1 - a) ||X_j||_2

so en-modified at a = 0 is wanda and the two geometries coincide at a = 1.
A new method is one function of (norms, alpha) added to METHODS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ActivationNorms:
    """Per input feature: l1 = sum |x| and l2sq = sum x^2, or their means over tokens."""

    l1: torch.Tensor
    l2sq: torch.Tensor


def magnitude_scale(norms: ActivationNorms | None, alpha: float) -> torch.Tensor:
    return torch.ones((), dtype=torch.float64)


def wanda_scale(norms: ActivationNorms, alpha: float) -> torch.Tensor:
    return norms.l2sq.sqrt()


def en_original_scale(norms: ActivationNorms, alpha: float) -> torch.Tensor:
    return alpha * norms.l1 + (1.0 - alpha) * norms.l2sq


def en_modified_scale(norms: ActivationNorms, alpha: float) -> torch.Tensor:
    return alpha * norms.l1 + (1.0 - alpha) * norms.l2sq.sqrt()


METHODS = {
    "magnitude": magnitude_scale,
    "wanda": wanda_scale,
    "en-original": en_original_scale,
    "en-modified": en_modified_scale,
}


# Methods that need no calibration data: the engine skips the forward passes for them.
WEIGHT_ONLY = {"magnitude"}


def feature_scale(method: str, norms: ActivationNorms, alpha: float) -> torch.Tensor:
    """The per-input-feature factor of the score, computed in the statistics' precision (float64)."""
    return METHODS[method](norms, alpha)


def scores(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|W_ij| * scale_j, shape (out_features, in_features), in float32 (float64 for float64 weights)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return weight.detach().abs().to(dtype) * scale.to(device=weight.device, dtype=dtype)
