#!/usr/bin/env python3
"""An independent, whole-model reference for streamprune's masks (and SparseGPT's weights), and a checker.

The reference loads the entire model with transformers, and for block i = 0, 1, ...: puts forward
hooks on the block's linears, runs the model (its blocks 0..i, earlier ones already pruned) on all the
calibration windows at once, removes the hooks, and prunes the block with the formulas written out
here again.  It shares no code with streamprune, so agreement means something.

  python tools/reference_prune.py PRUNED_DIR --model DENSE_DIR [--blocks 4] [--dtype float32]

reads the method, options and the exact token ids from PRUNED_DIR's manifest and prints the share of
mask entries on which the two agree, per block and overall.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM


def _scale(method: str, s1, s2, tokens: int, alpha: float, stat_norm: str):
    if stat_norm == "mean":
        s1, s2 = s1 / tokens, s2 / tokens
    if method == "magnitude":
        return torch.ones_like(s1)
    if method == "wanda":
        return torch.sqrt(s2)
    if method == "en-original":
        return alpha * s1 + (1 - alpha) * s2
    if method == "en-modified":
        return alpha * s1 + (1 - alpha) * torch.sqrt(s2)
    raise ValueError(method)


def _mask(score: torch.Tensor, sparsity: float, pattern: str | None) -> torch.Tensor:
    keep = torch.ones_like(score, dtype=torch.bool)
    if pattern:
        n, m = (int(v) for v in pattern.split(":"))
        grouped = score.reshape(score.shape[0], -1, m)
        lowest = torch.argsort(grouped, dim=2, stable=True)[:, :, :n]
        keep.view(score.shape[0], -1, m).scatter_(2, lowest, False)
        return keep
    k = math.floor(sparsity * score.shape[1] + 1e-9)
    lowest = torch.argsort(score, dim=1, stable=True)[:, :k]
    return keep.scatter_(1, lowest, False)


# Where each family's transformers model keeps its decoder, and the prefix its checkpoints store the
# blocks under, written out by hand (streamprune derives them; the reference must not share that).
_DECODERS = {
    "opt": ("model.decoder", "model.decoder.layers"),
    "gpt_neox": ("gpt_neox", "gpt_neox.layers"),
    "gemma3": ("model.language_model", "language_model.model.layers"),
}


def decoder_of(model):
    """(the module holding the blocks as .layers, the stored-name prefix of block tensors)."""
    path, stored = _DECODERS.get(model.config.model_type, ("model", "model.layers"))
    return model.get_submodule(path), stored


def _inputs_of_block(model, i, input_ids, add) -> dict:
    """Runs the model's blocks 0..i on all the windows at once, calling add(linear name, its input as
    (tokens, in_features) float64) for every linear of block i; returns block i's linears by name."""
    decoder, _ = decoder_of(model)
    layers = decoder.layers
    linears = {n: m for n, m in layers[i].named_modules() if isinstance(m, nn.Linear)}

    def hook(name, inputs):
        add(name, inputs[0].reshape(-1, inputs[0].shape[-1]).double())

    handles = [m.register_forward_pre_hook(lambda mod, inputs, n=n: hook(n, inputs)) for n, m in linears.items()]
    try:
        decoder.layers = layers[: i + 1]
        decoder(input_ids=input_ids, use_cache=False)
    finally:
        decoder.layers = layers
        for handle in handles:
            handle.remove()
    return linears


@torch.no_grad()
def _prune_sequentially(model_dir, input_ids, dtype, blocks, add, prune) -> None:
    """The whole model, its first `blocks` blocks (all by default) pruned in order: for block i, one
    dense pass of blocks 0..i (the earlier ones already pruned) calls add(stats, linear name, input) to
    gather block i's statistics into the dict `stats`, then prune(f"{stored prefix}.{i}.{name}.weight",
    linear, stats[name]) changes each linear's weight in place."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    decoder, stored = decoder_of(model)
    count = len(decoder.layers) if blocks is None else blocks
    for i in range(count):
        stats = {}
        linears = _inputs_of_block(model, i, input_ids, lambda name, x: add(stats, name, x))
        for name, linear in linears.items():
            prune(f"{stored}.{i}.{name}.weight", linear, stats[name])


def reference_masks(model_dir, input_ids, method, alpha, sparsity, pattern=None, stat_norm="mean", dtype=torch.float32, blocks=None):
    """{tensor name: keep-mask} for the first `blocks` blocks (all by default), pruned sequentially."""
    masks = {}

    def add(sums, name, x):
        s1, s2, tokens = sums.get(name, (0.0, 0.0, 0))
        sums[name] = (s1 + x.abs().sum(0), s2 + (x * x).sum(0), tokens + x.shape[0])

    def prune(key, linear, sums):
        s1, s2, tokens = sums
        score = linear.weight.abs().double() * _scale(method, s1, s2, tokens, alpha, stat_norm)
        keep = _mask(score, sparsity, pattern)
        linear.weight[~keep] = 0
        masks[key] = keep

    _prune_sequentially(model_dir, input_ids, dtype, blocks, add, prune)
    return masks


def _sparsegpt_unblocked(weight, gram, sparsity, pattern, blocksize, percdamp, keep=None):
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1) written out plainly in float64: every column's
    OBS update applied to all later columns at once (no lazy batches), the inverse by torch.linalg.inv,
    masks by stable argsort.  Returns the new weight."""
    w = weight.double().clone()
    h = gram.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += percdamp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h)).T  # upper, u^T u = H^-1
    rows, columns = w.shape
    pruned = torch.zeros_like(w, dtype=torch.bool) if keep is None else ~keep
    for i in range(columns):
        if keep is None and not pattern and i % blocksize == 0:
            end = min(i + blocksize, columns)
            saliency = (w[:, i:end] ** 2 / torch.diag(u)[i:end] ** 2).flatten()
            k = math.floor(sparsity * saliency.numel() + 1e-9)
            chosen = torch.zeros(saliency.numel(), dtype=torch.bool)
            chosen[torch.argsort(saliency, stable=True)[:k]] = True
            pruned[:, i:end] = chosen.reshape(rows, end - i)
        if pattern:
            n, m = (int(v) for v in pattern.split(":"))
            if i % m == 0:
                saliency = w[:, i : i + m] ** 2 / torch.diag(u)[i : i + m] ** 2
                lowest = torch.argsort(saliency, dim=1, stable=True)[:, :n]
                pruned[:, i : i + m].scatter_(1, lowest, True)
        q = torch.where(pruned[:, i], torch.zeros_like(w[:, i]), w[:, i])
        error = (w[:, i] - q) / u[i, i]
        w[:, i:] -= torch.outer(error, u[i, i:])
        w[:, i] = q
    return w


def reference_sparsegpt(model_dir, input_ids, sparsity, pattern=None, blocksize=128, percdamp=0.01, blocks=None,
                        masks_from=None):
    """{tensor name: new weight (float64)} of SparseGPT on the whole model in float64, block by block:
    the Gram matrices X^T X of each block's linears from one dense pass of the (already pruned) earlier
    blocks, every linear pruned, then the next block.  With masks_from ({name: keep-mask}), the masks
    are held and only the kept weights updated (reconstruction)."""
    weights = {}

    def add(grams, name, x):
        grams[name] = grams.get(name, 0.0) + x.T @ x

    def prune(key, linear, gram):
        keep = None if masks_from is None else masks_from[key]
        new = _sparsegpt_unblocked(linear.weight, gram, sparsity, pattern, blocksize, percdamp, keep)
        linear.weight.copy_(new)
        weights[key] = new

    _prune_sequentially(model_dir, input_ids, torch.float64, blocks, add, prune)
    return weights


def _pruned_weights(pruned_dir: Path, names) -> dict:
    """{tensor name: weight} read from a pruned checkpoint's shards."""
    index = json.loads((pruned_dir / "model.safetensors.index.json").read_text())["weight_map"]
    weights = {}
    for name in names:
        with safe_open(pruned_dir / index[name], framework="pt") as handle:
            weights[name] = handle.get_tensor(name)
    return weights


def pruned_masks(pruned_dir: Path, names) -> dict:
    """{tensor name: weight != 0} read from a pruned checkpoint's shards."""
    return {name: weight != 0 for name, weight in _pruned_weights(pruned_dir, names).items()}


def agreement(reference: dict, pruned: dict) -> tuple[float, dict]:
    """Overall share of equal mask entries, and per tensor."""
    per_tensor = {name: (reference[name] == pruned[name]).double().mean().item() for name in reference}
    total = sum(reference[n].numel() for n in reference)
    return 1 - differing(reference, pruned) / total, per_tensor


def differing(reference: dict, pruned: dict) -> int:
    """How many mask entries differ, over all tensors."""
    return sum((reference[n] != pruned[n]).sum().item() for n in reference)


def main() -> int:
    parser = argparse.ArgumentParser(description="Compare a pruned checkpoint's masks with a whole-model reference.")
    parser.add_argument("pruned")
    parser.add_argument("--model", required=True, help="the dense checkpoint the pruned one was made from")
    parser.add_argument("--blocks", type=int, help="compare only the first N blocks (the reference costs N^2/2 block passes)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    args = parser.parse_args()
    pruned_dir = Path(args.pruned)
    manifest = json.loads((pruned_dir / "streamprune.json").read_text())
    options = manifest["config"]
    with safe_open(pruned_dir / manifest["calibration_ids"], framework="pt") as handle:
        input_ids = handle.get_tensor("input_ids")
    if not len(input_ids):  # a method without statistics (magnitude) drew no text; its masks ignore the inputs
        input_ids = torch.zeros((1, options["seqlen"]), dtype=torch.int64)
    if options["method"] == "sparsegpt" or options.get("reconstruct"):
        # the weights are the result: SparseGPT's own masks, or (reconstruction) the output's masks held
        names = [n for n in json.loads((pruned_dir / "model.safetensors.index.json").read_text())["weight_map"]
                 if ".layers." in n and n.endswith("proj.weight")]
        held = pruned_masks(pruned_dir, names) if options.get("reconstruct") else None
        weights = reference_sparsegpt(args.model, input_ids, options["sparsity"], options["pattern"], options["blocksize"],
                                      options["percdamp"], args.blocks, masks_from=held)
        written = _pruned_weights(pruned_dir, weights)
        worst = max((written[n].double() - w).abs().max().item() / max(w.abs().max().item(), 1e-30) for n, w in weights.items())
        print(f"largest difference of the weights, relative to each tensor's largest: {worst:.3e}")
        reference = {name: weight != 0 for name, weight in weights.items()}
    else:
        reference = reference_masks(
            args.model, input_ids, options["method"], options.get("alpha", 0.0), options["sparsity"], options["pattern"],
            options["stat_norm"], getattr(torch, args.dtype), args.blocks,
        )
    pruned = pruned_masks(pruned_dir, reference)
    overall, per_tensor = agreement(reference, pruned)
    for name, share in per_tensor.items():
        print(f"{name:60s} {100 * share:9.4f}%")
    entries = sum(m.numel() for m in reference.values())
    print(f"agreement over {len(per_tensor)} tensors: {100 * overall:.4f}% "
          f"({differing(reference, pruned)} of {entries} mask entries differ)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
