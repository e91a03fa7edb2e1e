"""Per-input-feature activation statistics of every linear layer of a block, collected by hooks."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .scoring import ActivationNorms


class InputStatistics:
    """Running sums over all tokens seen by one linear layer: sum |x_j| and sum x_j^2, in float64."""

    def __init__(self, in_features: int, device: torch.device):
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.abs_sum += x.abs().sum(dim=0, dtype=torch.float64)
        self.sq_sum += x.square().sum(dim=0, dtype=torch.float64)
        self.tokens += x.shape[0]

    def norms(self, stat_norm: str) -> ActivationNorms:
        """'sum': the raw norms; 'mean': divided by the token count, so they do not grow with the data."""
        if stat_norm == "sum":
            return ActivationNorms(l1=self.abs_sum, l2sq=self.sq_sum)
        return ActivationNorms(l1=self.abs_sum / self.tokens, l2sq=self.sq_sum / self.tokens)


def linear_layers(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a block, by its name relative to the block (e.g. 'self_attn.q_proj')."""
    return {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}


@contextmanager
def input_statistics(block: nn.Module):
    """Yields {linear name: InputStatistics}, filled by every forward of the block; hooks always removed."""
    layers = linear_layers(block)
    statistics = {}
    handles = []
    try:
        for name, linear in layers.items():
            stat = InputStatistics(linear.in_features, linear.weight.device)
            statistics[name] = stat
            handles.append(linear.register_forward_pre_hook(lambda _m, args, stat=stat: stat.add(args[0])))
        yield statistics
    finally:
        for handle in handles:
            handle.remove()
    unseen = [name for name, stat in statistics.items() if stat.tokens == 0]
    if unseen:
        raise RuntimeError(f"no calibration input reached {', '.join(unseen)}")
