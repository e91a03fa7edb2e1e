"""The OBS update of SparseGPT: prune a weight column by column and compensate on the columns not yet
pruned, from the inverse of the Gram matrix of the layer's inputs.

Source: Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(ICML 2023), Algorithm 1, as the authors' code (IST-DASLab/sparsegpt, `fasterprune`) computes it.  For a
linear layer y = x W^T with W (rows, columns) and calibration inputs X (tokens, columns):

  H = X^T X (any positive multiple gives the same result); dead inputs (H_jj = 0) get H_jj = 1 and
  their column of W is zeroed; H += percdamp * mean(diag H) * I; U = the upper Cholesky factor of H^-1,
  so that row i of U holds the OBS update of the columns after i once columns before i are fixed.
  Columns are taken in blocks of `blocksize`.  For column i with d = U_ii: q = w_i with the pruned
  entries set to 0, err = (w_i - q) / d, and every later column j gets w_j -= err * U_ij (inside the
  block at once, after the block lazily as one matrix product: the same arithmetic, batched).

Which entries are pruned:
  - unstructured (SparseGPT's adaptive mask selection): at the start of each block, over the whole
    block (all rows x `blocksize` columns) the floor(sparsity * entries) entries with the smallest
    w^2 / U_jj^2 are pruned (ties by position, row-major, as masking.row_mask breaks them).  The
    comparison group is that block, not a row.  (The authors' code prunes everything at or below the
    k-th smallest with k counted from 0, one entry more per block: 1 in 65,536 for 512 rows.)
  - N:M: in every group of M consecutive columns of a row, the N smallest w^2 / U_jj^2, chosen when the
    group is reached (after the updates from the columns before it).
  - a given mask (reconstruction): pruned entries fixed in advance; the kept ones are updated.  This
    minimises the layer's output error ||W X^T - W' X^T||^2 on the calibration inputs greedily, one
    column at a time, with each column's error propagated to the columns not yet fixed.
"""

from __future__ import annotations

import torch

from .errors import NumericalError
from .masking import row_mask
from .methods import Option

OPTIONS = (
    Option("percdamp", 0.01, "Damping of the Gram matrix, as a share of its mean diagonal.", low=0.0, high=10.0),
    Option("blocksize", 128, "Columns decided and updated together (lazy batch updates).", low=1, high=2**20, integer=True),
)


def inverse_factor(gram: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U the upper Cholesky factor of (H + damp I)^-1 with dead inputs' H_jj set to 1, in
    H's dtype; dead a bool vector of the inputs no calibration token used.  Working memory: two
    (columns, columns) matrices besides H.  Raises NumericalError when
    H + damp I is not positive definite (percdamp 0 with linearly dependent inputs)."""
    h = gram.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(percdamp * torch.mean(torch.diag(h)))
    factor, info = torch.linalg.cholesky_ex(h)
    del h  # at most two (columns, columns) temporaries at once: on a GPU these are the block's largest
    if int(info):
        raise NumericalError("the damped Gram matrix is not positive definite; raise --percdamp")
    inverse = torch.cholesky_inverse(factor)
    del factor
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    del inverse
    if int(info):
        raise NumericalError("the inverse Gram matrix is not positive definite; raise --percdamp")
    return upper, dead


def obs_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    *,
    sparsity: float = 0.0,
    pattern: tuple[int, int] | None = None,
    keep: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one weight: (the new weight, its keep-mask).

    weight: (rows, columns), any float dtype, not changed; the work and the result are in float32, or
    float64 for float64 weights.  gram: (columns, columns) X^T X of the layer's inputs.  Prunes by
    `sparsity` (unstructured), `pattern` (N, M), or the given `keep` mask (bool, True = keep).  Pruned
    entries and dead columns are exactly 0 in the result.
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w = weight.detach().to(dtype).clone()
    rows, columns = w.shape
    upper, dead = inverse_factor(gram.to(dtype), percdamp)
    w[:, dead] = 0
    pruned = torch.zeros_like(w, dtype=torch.bool) if keep is None else ~keep.to(w.device)
    n, m = pattern if pattern else (0, 0)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        block = w[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        u = upper[i1:i2, i1:i2]
        if keep is None and not pattern:
            saliency = block.square() / u.diagonal().square()[None, :]
            pruned[:, i1:i2] = ~row_mask(saliency.reshape(1, -1), sparsity).reshape(saliency.shape)
        for i in range(i2 - i1):
            if pattern and i % m == 0:
                saliency = block[:, i : i + m].square() / u.diagonal()[i : i + m].square()[None, :]
                lowest = torch.topk(saliency, n, dim=1, largest=False).indices
                pruned[:, i1 + i : i1 + i + m].scatter_(1, lowest, True)
            column = block[:, i]
            kept = column.masked_fill(pruned[:, i1 + i], 0)
            error = (column - kept) / u[i, i]
            block[:, i:] -= error[:, None] * u[i, i:][None, :]
            block[:, i] = kept  # exactly the kept values, pruned entries exactly 0
            errors[:, i] = error
        w[:, i1:i2] = block
        w[:, i2:] -= errors @ upper[i1:i2, i2:]
    return w, ~pruned
