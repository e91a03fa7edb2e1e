"""Scores -> keep-masks (True = keep), always within one output row of the weight.

Ties are broken by position, as a stable ascending sort would: among equal scores the lower input
index is pruned first.  The per-row mask finds the k-th smallest score with a selection (kthvalue,
about 4x faster than sorting a row of 11008) and prunes everything at or below it; only where a row
has ties at that value does it prune, among the scores equal to it, the first ones by index until k
are pruned.  Both work on any block of rows.
"""

from __future__ import annotations

import math
import re

import torch

from .errors import StreamPruneError

ROW_CHUNK = 256  # rows scored, masked and checked at once: bounds the memory of scores and selections


def pruned_per_row(in_features: int, sparsity: float) -> int:
    """floor(sparsity * in_features), tolerant of binary rounding (0.29 * 100 is 28.999...)."""
    return math.floor(sparsity * in_features + 1e-9)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, zero the floor(sparsity * in_features) lowest scores."""
    k = pruned_per_row(scores.shape[1], sparsity)
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    at_most = scores <= threshold
    if bool((at_most.sum(dim=1, dtype=torch.int32) == k).all()):  # no ties at the threshold: the usual case
        return ~at_most
    below = scores < threshold
    ties = scores == threshold
    still_needed = k - below.sum(dim=1, keepdim=True, dtype=torch.int32)
    first_ties = ties & (ties.cumsum(dim=1, dtype=torch.int32) <= still_needed)
    return ~(below | first_ties)


def zero_fraction(tensor: torch.Tensor) -> float:
    """The share of entries equal to zero (count_nonzero: 30x faster than (t == 0).sum() on float16)."""
    return (tensor.numel() - torch.count_nonzero(tensor).item()) / tensor.numel()


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of m consecutive inputs of a row, zero the n lowest scores."""
    rows, in_features = scores.shape
    if in_features % m:
        raise ValueError(f"in_features {in_features} is not divisible by M={m}")
    groups = scores.reshape(rows, in_features // m, m)
    lowest = torch.sort(groups, dim=2, stable=True).indices[:, :, :n]
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, lowest, False)
    return keep.reshape(rows, in_features)


def verify_sparsity(weight: torch.Tensor, sparsity: float, groups) -> tuple[float, str | None]:
    """The post-condition of a pruned weight, checked on the values to be written.

    weight: (out_features, in_features), any dtype.  `groups` (methods.Groups) are the method's
    comparison groups: `columns` consecutive inputs of a row (the whole row for Wanda, M for N:M), or of
    all rows at once (SparseGPT's column blocks); each must hold at least `n` zeros, or
    floor(sparsity * its size).  "At least": zeros the input already had count too.  Returns the share
    of zeros (for the manifest; -0.0 counts as zero, NaN does not) and None, or a description of the
    first group that falls short.  Per-row groups are counted ROW_CHUNK rows at a time ((chunk == 0).sum
    per row is 4x faster than on the whole matrix, which leaves the cache).
    """
    rows, in_features = weight.shape
    width = min(groups.columns, in_features)
    if groups.all_rows:
        zeros, first_short = 0, None
        for start in range(0, in_features, width):
            block = weight[:, start : start + width]
            have = int((block == 0).sum())
            need = groups.n if groups.n is not None else pruned_per_row(block.numel(), sparsity)
            zeros += have
            if have < need and first_short is None:
                first_short = f"inputs {start} to {start + block.shape[1] - 1} (all rows) hold {have} zeros, fewer than the {need} asked"
        return zeros / weight.numel(), first_short
    if in_features % width:
        raise ValueError(f"groups of {width} inputs do not divide {in_features}")
    need = groups.n if groups.n is not None else pruned_per_row(width, sparsity)
    zeros = torch.zeros((), dtype=torch.int64, device=weight.device)
    short = torch.zeros((), dtype=torch.int64, device=weight.device)
    for start in range(0, rows, ROW_CHUNK):
        chunk = weight[start : start + ROW_CHUNK]
        per_group = (chunk.reshape(chunk.shape[0], in_features // width, width) == 0).sum(dim=2, dtype=torch.int32)
        zeros += per_group.sum()
        short += (per_group < need).sum()
    if int(short):  # only now look for where, to say it
        per_group = (weight.reshape(rows, in_features // width, width) == 0).sum(dim=2)
        row, group = (per_group < need).nonzero()[0].tolist()
        where = f"row {row}" if width == in_features else f"row {row}, inputs {group * width} to {group * width + width - 1},"
        return int(zeros) / weight.numel(), f"{where} has {int(per_group[row, group])} zeros, fewer than the {need} asked"
    return int(zeros) / weight.numel(), None


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): zero the N lowest scores in every group of M consecutive inputs."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not match:
        raise StreamPruneError(f"pattern must look like N:M (for example 2:4), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise StreamPruneError(f"pattern {pattern!r} needs 0 < N < M")
    return n, m
