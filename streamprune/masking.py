"""Scores -> keep-masks (True = keep), always within one output row of the weight.

Ties are broken by position: rows are sorted ascending with a stable sort, so among equal scores the
lower input index is pruned first.  Rows are processed in chunks to bound the memory of the sort.
"""

from __future__ import annotations

import math

import torch

ROW_CHUNK = 1024


def pruned_per_row(in_features: int, sparsity: float) -> int:
    """floor(sparsity * in_features), tolerant of binary rounding (0.29 * 100 is 28.999...)."""
    return math.floor(sparsity * in_features + 1e-9)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, zero the floor(sparsity * in_features) lowest scores."""
    rows, in_features = scores.shape
    k = pruned_per_row(in_features, sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k == 0:
        return keep
    for start in range(0, rows, ROW_CHUNK):
        chunk = scores[start : start + ROW_CHUNK]
        lowest = torch.sort(chunk, dim=1, stable=True).indices[:, :k]
        keep[start : start + ROW_CHUNK].scatter_(1, lowest, False)
    return keep


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of m consecutive inputs of a row, zero the n lowest scores."""
    rows, in_features = scores.shape
    if in_features % m:
        raise ValueError(f"in_features {in_features} is not divisible by M={m}")
    keep = torch.ones_like(scores, dtype=torch.bool)
    for start in range(0, rows, ROW_CHUNK):
        groups = scores[start : start + ROW_CHUNK].reshape(-1, in_features // m, m)
        lowest = torch.sort(groups, dim=2, stable=True).indices[:, :, :n]
        keep_groups = keep[start : start + ROW_CHUNK].view(-1, in_features // m, m)
        keep_groups.scatter_(2, lowest, False)
    return keep
