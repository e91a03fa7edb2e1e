"""SparseGPT: the mask chosen with second-order information, the kept weights updated to compensate.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (ICML 2023),
Algorithm 1 with adaptive mask selection, computed as the authors' code does (obs.py has the maths).
Statistics: the Gram matrix X^T X of each linear's inputs over all calibration tokens (float32, or
float64 for float64 compute), from the dense block's forward pass like Wanda's norms.  The comparison
group, unstructured: a block of `blocksize` consecutive input columns across all output rows (the
entries with the smallest w^2 / [H^-1]_jj^2 in the block, at least floor(sparsity x entries) of them);
N:M: every group of M consecutive inputs of a row, as for Wanda.
"""

from __future__ import annotations

from ..config import parse_pattern
from ..errors import StreamPruneError
from ..obs import OPTIONS, obs_prune
from . import Decision, Groups, Method
from .scaled import scores


class SparseGPT(Method):
    name = "sparsegpt"
    summary = "min ||W X - W' X||^2: OBS updates of the kept weights (second order)"
    source = "Frantar & Alistarh 2023, Algorithm 1"
    order = 10
    group = "a block of --blocksize inputs, all rows"
    needs = frozenset({"gram"})
    updates_weights = True
    options = OPTIONS

    def decide(self, weight, stats, config, name) -> Decision:
        options = config.option_values
        pattern = parse_pattern(config.pattern) if config.pattern else None
        new, keep = obs_prune(
            weight, stats.gram, sparsity=config.sparsity, pattern=pattern,
            blocksize=options["blocksize"], percdamp=options["percdamp"],
        )
        return Decision(keep, new)

    outlier_needs = frozenset({"norms"})

    def outlier_scores(self, weight, stats, config):
        """Wanda's |W_ij| ||X_j||_2, as OWL's code scores SparseGPT's blocks (its own saliency needs the
        inverse Gram matrix and changes as columns are pruned)."""
        return scores(weight, stats.norms(config.stat_norm).l2sq.sqrt())

    def groups(self, config, in_features: int) -> Groups:
        if config.pattern:
            n, m = parse_pattern(config.pattern)
            return Groups(columns=m, n=n)
        return Groups(columns=config.option_values["blocksize"], all_rows=True)

    def check_config(self, config, in_features: int) -> None:
        if config.pattern:
            _, m = parse_pattern(config.pattern)
            if config.option_values["blocksize"] % m:
                raise StreamPruneError(
                    f"--blocksize {config.option_values['blocksize']} is not a multiple of M = {m} of --pattern {config.pattern}"
                )


METHODS = [SparseGPT()]
