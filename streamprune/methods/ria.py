"""RIA: relative importance of a weight within its row and its column, times the input norm to a power.

Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language Models"
(ICLR 2024), eq. 1-2, as the authors' code computes it: for W (out_features, in_features) and the L2
norm ||X_j|| of input feature j over the calibration tokens,

    RIA_ij = ( |W_ij| / sum_i' |W_i'j|  +  |W_ij| / sum_j' |W_ij'| ) * ||X_j||^a        (a = --act-power)

The comparison group is the whole layer (the authors' default; not per row as Wanda): the
floor(sparsity x entries) lowest scores of the weight are pruned, ties by position (row-major).  With
--pattern N:M, the N lowest of every M consecutive inputs of a row.  Kept weights are not changed (use
--reconstruct to update them).  The norm's scale (sum or mean over tokens) does not change the ranking.
"""

from __future__ import annotations

import torch

from ..masking import n_m_mask, parse_pattern, row_mask
from . import Decision, Groups, Method, Option


class RIA(Method):
    name = "ria"
    summary = "(|W| / column sum + |W| / row sum) L2^a, ranked over the whole layer"
    source = "Zhang et al. 2024, eq. 1-2"
    group = "the whole layer"
    needs = frozenset({"norms"})
    options = (Option("act_power", 0.5, "RIA's exponent a of the input norm.", low=0.0, high=10.0),)

    def decide(self, weight, stats, config, name) -> Decision:
        score = self.outlier_scores(weight, stats, config)
        if config.pattern:
            return Decision(n_m_mask(score, *parse_pattern(config.pattern)))
        return Decision(row_mask(score.reshape(1, -1), config.sparsity).reshape(score.shape))

    def outlier_scores(self, weight, stats, config):
        """RIA's score of every entry (also what --budgets owl counts outliers of)."""
        magnitude = weight.detach().abs().to(torch.promote_types(weight.dtype, torch.float32))
        tiny = torch.finfo(magnitude.dtype).tiny  # an all-zero row or column scores 0, not NaN
        relative = magnitude / magnitude.sum(dim=0, keepdim=True).clamp_min(tiny)
        relative += magnitude / magnitude.sum(dim=1, keepdim=True).clamp_min(tiny)
        norm = stats.norms(config.stat_norm).l2sq.sqrt().to(relative)
        return relative * norm.pow(config.option_values["act_power"])[None, :]

    def groups(self, config, in_features: int) -> Groups:
        if config.pattern:
            n, m = parse_pattern(config.pattern)
            return Groups(columns=m, n=n)
        return Groups(columns=in_features, all_rows=True)


METHODS = [RIA()]
