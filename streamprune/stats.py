"""Statistics of the inputs of every linear layer of a block, collected by hooks in one forward pass.

Which ones a run needs comes from its method (methods/): `norms`, the per-input-feature sums
sum |x_j| and sum x_j^2 (Wanda and the Elastic-Net scores), and `gram`, the Gram (Hessian) matrix
H = X^T X = sum over tokens of x x^T (SparseGPT, reconstruction).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

TOKEN_CHUNK = 2048  # tokens summed at once in float32 (11008 features: 90 MB per temporary)
STATISTICS = ("norms", "gram")


@dataclass(frozen=True)
class ActivationNorms:
    """Per input feature (float64 vectors of in_features): l1 = sum |x| and l2sq = sum x^2, or their
    means over tokens."""

    l1: torch.Tensor
    l2sq: torch.Tensor


def column_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum |x_j|, sum x_j^2) over the rows (tokens) of x, as float64 vectors.

    Each chunk of TOKEN_CHUNK rows is summed in float32 (float64 for float64 input; PyTorch sums in
    cascades, so the error is about 1e-7 relative), and the chunk sums are added up in float64.  This is
    8x faster on a CPU than casting every element to float64, and float16/bfloat16 values and their
    squares are exact in float32.
    """
    x = x.detach().reshape(-1, x.shape[-1])
    abs_sum = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
    sq_sum = torch.zeros_like(abs_sum)
    for rows in x.split(TOKEN_CHUNK):
        wide = rows.to(torch.promote_types(rows.dtype, torch.float32), copy=True)  # ours to change in place
        abs_sum += wide.abs_().sum(dim=0)
        sq_sum += wide.square_().sum(dim=0)
    return abs_sum, sq_sum


def add_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram += X^T X for the tokens (rows) of x (..., in_features), TOKEN_CHUNK rows at a time in the
    Gram matrix's dtype (float32, or float64 for float64 inputs), so temporaries stay one chunk."""
    x = x.detach().reshape(-1, x.shape[-1])
    for rows in x.split(TOKEN_CHUNK):
        wide = rows.to(gram.dtype)
        gram.addmm_(wide.T, wide)


class InputStatistics:
    """Running statistics over all tokens seen by one linear layer.

    abs_sum, sq_sum: sum |x_j| and sum x_j^2 (float64, in_features), kept when `norms` is asked for;
    gram: sum x x^T (in_features x in_features; float32, float64 for float64 inputs), when `gram` is
    asked for, and then the very same tensor for every linear fed the same input (q, k and v share one).
    `first_call` is the linear's place in the block's call order (0 for the first linear called), so
    that an overflow is reported where it first showed.
    """

    def __init__(self, in_features: int, device: torch.device):
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.gram: torch.Tensor | None = None
        self.tokens = 0
        self.first_call: int | None = None

    def finite(self) -> bool:
        """Whether the statistics are finite: a NaN or infinity anywhere in the inputs makes them not."""
        total = self.abs_sum.sum() + self.sq_sum.sum()
        if self.gram is not None:
            total = total + self.gram.diagonal().sum()  # sum of x_j^2: the diagonal sees every input
        return bool(torch.isfinite(total))

    def add_sums(self, abs_sum: torch.Tensor, sq_sum: torch.Tensor, tokens: int) -> None:
        """Adds the column sums (column_sums) of `tokens` more tokens."""
        self.abs_sum += abs_sum
        self.sq_sum += sq_sum
        self.tokens += tokens

    def norms(self, stat_norm: str) -> ActivationNorms:
        """'sum': the raw norms; 'mean': divided by the token count, so they do not grow with the data."""
        if stat_norm == "sum":
            return ActivationNorms(l1=self.abs_sum, l2sq=self.sq_sum)
        return ActivationNorms(l1=self.abs_sum / self.tokens, l2sq=self.sq_sum / self.tokens)


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a block, by its name relative to the block (e.g. 'self_attn.q_proj')."""
    return {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def _zeros_like_output(linear: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], linear.out_features)

    return forward


@contextmanager
def input_statistics(block: nn.Module, needs=("norms",)):
    """Yields {linear name: InputStatistics}, filled by every forward of the block; hooks always removed.

    `needs`: which statistics (STATISTICS) to gather.  Raises RuntimeError if a linear saw no input, or
    if linears that shared an input tensor in one forward did not in another (their Gram matrix is one).

    A pass that only gathers statistics needs the inputs of the linears, not the block's output: from
    the second forward on, the linear called last (down_proj in LLaMA blocks, whose output feeds no other
    linear) returns zeros instead of multiplying, which saves about a sixth of the pass.  Linears fed
    the very same tensor (q, k and v; gate and up) share one computation of its sums, unless the tensor
    changed in place in between, which its version counter shows.  Inference tensors (made under
    torch.inference_mode) have no version counter, so for them every linear computes its own sums: run
    the statistics pass under torch.no_grad to share them (DecoderStack.run_block does).
    """
    unknown = set(needs) - set(STATISTICS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {STATISTICS}")
    layers = linear_layers(block)
    statistics = {}
    call_order: list[str] = []
    handles = []
    last_input: list = [None, -1, None, None]  # [tensor, its version counter, its column sums, Gram added to]
    grams_added: list = []  # Gram matrices already given this forward's inputs

    def record(name: str, stat: InputStatistics, args) -> None:
        x = args[0]
        version = None if x.is_inference() else x._version
        same = version is not None and x is last_input[0] and version == last_input[1]
        if not same:
            last_input[:] = [x, version, column_sums(x) if "norms" in needs else None, None]
        tokens = x.numel() // x.shape[-1]
        if "norms" in needs:
            stat.add_sums(*last_input[2], tokens=tokens)
        else:
            stat.tokens += tokens
        if "gram" in needs:
            if same and last_input[3] is not None:  # added already, for the linear called just before
                if stat.gram is None:
                    stat.gram = last_input[3]
                elif stat.gram is not last_input[3]:
                    raise RuntimeError(f"{name} shares its input with another linear in one batch and not in another")
            else:
                if stat.gram is None:
                    dtype = torch.promote_types(x.dtype, torch.float32)
                    stat.gram = torch.zeros(x.shape[-1], x.shape[-1], dtype=dtype, device=x.device)
                if any(stat.gram is added for added in grams_added):
                    raise RuntimeError(f"{name} shares its input with another linear in one batch and not in another")
                add_gram(stat.gram, x)
                grams_added.append(stat.gram)
                last_input[3] = stat.gram
        if name not in call_order:
            stat.first_call = len(call_order)
            call_order.append(name)

    def after_each_forward(_module, _args, _output) -> None:
        last_input[:] = [None, -1, None, None]  # hold no activation between batches
        grams_added.clear()
        last = layers[call_order[-1]]
        if "forward" not in last.__dict__:
            last.forward = _zeros_like_output(last)

    try:
        for name, linear in layers.items():
            stat = InputStatistics(linear.in_features, linear.weight.device)
            statistics[name] = stat
            handles.append(linear.register_forward_pre_hook(lambda _m, args, name=name, stat=stat: record(name, stat, args)))
        if layers:
            handles.append(block.register_forward_hook(after_each_forward))
        yield statistics
    finally:
        last_input.clear()
        for handle in handles:
            handle.remove()
        for linear in layers.values():
            linear.__dict__.pop("forward", None)
    unseen = [name for name, stat in statistics.items() if stat.tokens == 0]
    if unseen:
        raise RuntimeError(f"no calibration input reached {', '.join(unseen)}")
