"""Layer-wise sparsity budgets: every block at the run's sparsity (`uniform`), or OWL's.

OWL: Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to
High Sparsity" (ICML 2024), section 3 and the authors' code (`prune_wanda_outlier`).  A first pass over
every block, the hidden states propagated through the *dense* blocks, scores each linear's weights with
the run's method (methods.Method.outlier_scores: Wanda's |W_ij| ||X_j||_2 for wanda, the EN geometries'
own scale for en-*, |W| for magnitude, and Wanda's score for sparsegpt, as OWL's code does) and counts
the block's outlier ratio

    D_l = #{scores of block l > M * mean(scores of block l)} / #(scores of block l)

(all of a block's linears pooled, `--owl-m` M, default 5).  The ratios are mapped to sparsities as the
authors' code does (lambda `--owl-lambda`, default 0.08):

    d_l = 2 lambda (D_l - min D) / (max D - min D)
    s_l = s - (d_l - mean(d))

so the mean of the s_l is s exactly, their range is 2 lambda (the block with the most outliers loses
least), and each lies within [s - 2 lambda, s + 2 lambda] (within [s - lambda, s + lambda] when the d_l
are spread evenly).  Equal ratios give every block s.  Every block's linears then get that block's s_l.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .checkpoint import write_json
from .errors import StreamPruneError
from .methods import Option

BUDGETS = ("uniform", "owl")
OPTIONS = (  # options of --budgets owl (config.PruneConfig.allowed_options)
    Option("owl_m", 5.0, "OWL's outlier threshold M: a score above M times its block's mean is an outlier.", low=0.0, high=1e6),
    Option("owl_lambda", 0.08, "OWL's lambda: the blocks' sparsities span 2 lambda around --sparsity.", low=0.0, high=0.5),
)
BUDGETS_FILE = "budgets.json"  # beside the calibration ids: a resumed run uses it instead of a first pass


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """OWL's outlier ratio of one block: the share (not per cent) of the scores of all its weights
    (each tensor (out, in), any float dtype) above m times their mean, the mean taken over all of them
    in float64."""
    total = sum(score.numel() for score in scores)
    if total == 0:
        raise StreamPruneError("a block without weights to score has no outlier ratio")
    mean = sum(float(score.sum(dtype=torch.float64)) for score in scores) / total
    above = sum(int((score.double() > m * mean).sum()) for score in scores)
    return above / total


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-block sparsities from outlier ratios (the mapping in the module docstring), in float64.

    Raises StreamPruneError where a block's sparsity would leave [0, 1): lower --owl-lambda.
    """
    values = torch.tensor(ratios, dtype=torch.float64)
    spread = float(values.max() - values.min())
    if spread == 0:
        return [float(sparsity)] * len(ratios)
    d = (values - values.min()) / spread * (2 * lam)
    result = (sparsity - (d - d.mean())).tolist()
    if min(result) < 0 or max(result) >= 1:
        raise StreamPruneError(
            f"--owl-lambda {lam:g} around --sparsity {sparsity:g} gives a block a sparsity of "
            f"{min(result) if min(result) < 0 else max(result):.4f}, outside [0, 1); lower --owl-lambda"
        )
    return result


def save_budgets(path: Path, record: dict) -> None:
    """The budgets of a run (`sparsities` per block, `outlier_ratios`, options) as JSON, written
    atomically; floats are written as Python's repr, which reads back to the same bits."""
    write_json(path, record)


def load_budgets(path: Path, blocks: int) -> dict | None:
    """The saved budgets of an unfinished run, or None when there are none (the first pass did not end)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        sparsities = [float(s) for s in record["sparsities"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise StreamPruneError(f"{path} is unreadable ({exc}); pass --overwrite to start over") from exc
    if len(sparsities) != blocks or not all(math.isfinite(s) and 0 <= s < 1 for s in sparsities):
        raise StreamPruneError(f"{path} does not hold {blocks} sparsities in [0, 1); pass --overwrite to start over")
    return record
