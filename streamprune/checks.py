"""Guards: nothing non-finite and no unmet promise reaches an output marked complete.

What is checked, and where (benchmarks/prune_cpu.py measures the cost against a run without them):
  - every tensor read from a checkpoint is finite (CheckpointReader.iter_tensors, once per tensor: a
    min/max reduction, which propagates NaN and shows infinities, 2 ms for an 11008 x 4096 float16
    matrix on the 2-core development CPU); its largest magnitude is kept, so that a conversion to a
    narrower compute dtype (float32 -> float16) is checked without another pass (check_fits);
  - each linear's input statistics are finite (an overflow of the activations in the compute dtype
    shows there first), and the scores handed to the selection are finite (engine.py);
  - every pruned tensor is finite and meets its sparsity per comparison group before it is written
    (masking.verify_sparsity, engine.py), and log-likelihoods are finite (evaluate/runner.py).
The embeddings and LM head are read once more before calibration, to refuse them before any block.

The environment variable _STREAMPRUNE_UNCHECKED=1 turns the checks off.  It is private: it exists so
that the benchmark can measure their cost in the same run; a manifest records `"checked": false` for
an output made without them, and `streamprune inspect` says so.
"""

import math
import os

import torch

from .errors import StreamPruneError

ENABLED = os.environ.get("_STREAMPRUNE_UNCHECKED") != "1"


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite.  aminmax (no temporary; NaN propagates, infinities are extremes)
    takes 2 ms on an 11008 x 4096 float16 matrix on a CPU, isfinite().all() 93 ms (it builds a boolean
    tensor the size of the input)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def nonfinite_summary(tensor: torch.Tensor) -> str:
    """'1 non-finite value (NaN)', '3 non-finite values (2 NaN, 1 +inf)': for error messages only."""
    nan = int(torch.isnan(tensor).sum())
    positive = int(torch.isposinf(tensor).sum())
    negative = int(torch.isneginf(tensor).sum())
    kinds = [f"{n} {kind}" for n, kind in ((nan, "NaN"), (positive, "+inf"), (negative, "-inf")) if n]
    total = nan + positive + negative
    detail = kinds[0].split(" ", 1)[1] if len(kinds) == 1 else ", ".join(kinds)
    return f"{total} non-finite value{'s' * (total != 1)} ({detail})"


def stored_magnitude(key: str, tensor: torch.Tensor, filename: str | os.PathLike) -> float | None:
    """The largest |value| of a tensor read from a checkpoint, after refusing NaN and infinity.

    Returns None for integer tensors, empty ones, or with the checks off.  Raises StreamPruneError
    naming the tensor, its file and what it holds.
    """
    if not ENABLED or not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    low, high = (float(v) for v in torch.aminmax(tensor))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise StreamPruneError(
            f"{key} has {nonfinite_summary(tensor)} (in {filename}); streamprune will not prune or evaluate "
            "a damaged checkpoint"
        )
    return max(-low, high)


def check_fits(key: str, magnitude: float | None, dtype: torch.dtype) -> None:
    """Refuses a stored tensor whose largest |value| (stored_magnitude) overflows the compute dtype.

    Only a narrower dtype can overflow (float32 -> float16 above 65519); the magnitude is converted
    as the tensor is, so rounding is the same.  Raises StreamPruneError naming the tensor, its largest
    magnitude and the dtypes to use instead.
    """
    if magnitude is None or math.isfinite(float(torch.tensor(magnitude, dtype=torch.float64).to(dtype))):
        return
    raise StreamPruneError(
        f"{key} holds values up to {magnitude:.4g}, beyond the range of the compute dtype "
        f"{str(dtype).removeprefix('torch.')}; compute in {wider_dtypes(dtype)} instead (into an output "
        "that holds this run, also pass --overwrite)"
    )


def wider_dtypes(dtype: torch.dtype) -> str:
    """The --dtype advice when `dtype` overflowed."""
    return "--dtype bfloat16 or --dtype float32" if dtype == torch.float16 else "--dtype float64"


def first_nonfinite(values: list[torch.Tensor]) -> int | None:
    """The index of the first tensor with a non-finite entry, or None (also when the checks are off)."""
    if not ENABLED:
        return None
    return next((i for i, v in enumerate(values) if not all_finite(v)), None)
