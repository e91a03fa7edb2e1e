"""RIA (methods/ria.py): a method added as one file; hand-made masks and the first block of a tiny model."""

import json

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

import streamprune
from streamprune.config import PruneConfig
from streamprune.data import WIKITEXT_CALIBRATION
from streamprune.methods import get_method
from streamprune.stats import input_statistics


def ria_mask(weight, inputs, **options):
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(weight)
    config = PruneConfig.of(method="ria", calib="unused", **options)
    with torch.no_grad(), input_statistics(linear, config.statistics) as statistics:
        linear(inputs)
    return get_method("ria").decide(linear.weight, statistics[""], config, "w").keep.tolist()


def test_relative_importance_uses_column_and_row_sums_and_ranks_over_the_whole_layer():
    weight = torch.tensor([[1.0, 2.0], [3.0, 8.0]], dtype=torch.float64)
    inputs = torch.tensor([[1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)  # both inputs have norm sqrt(2)
    # RI = |W| / column sums (4, 10) + |W| / row sums (3, 11): 0.583, 0.867 / 1.023, 1.527.  The two lowest
    # of the layer are row 0's; per row (Wanda's group) it would be [[F, T], [F, T]]; |W| alone the same.
    assert ria_mask(weight, inputs, sparsity=0.5) == [[False, False], [True, True]]
    # the input norm to the power a: input 1 ten times louder lifts column 1 above row 1's first entry
    loud = torch.tensor([[1.0, 10.0], [-1.0, 10.0]], dtype=torch.float64)
    assert ria_mask(weight, loud, sparsity=0.5, act_power=1.0) == [[False, True], [False, True]]
    assert ria_mask(weight, loud, sparsity=0.5, act_power=0.0) == [[False, False], [True, True]]
    assert ria_mask(weight, inputs, pattern="1:2") == [[False, True], [False, True]]  # N:M: per row


def test_ria_prunes_a_tiny_model_as_an_independent_computation_of_its_first_block(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("qwen2")
    out = tmp_path / "out"
    manifest = streamprune.prune(model_dir, out, method="ria", sparsity=0.6, calib=str(WIKITEXT_CALIBRATION), nsamples=3,
                                 seqlen=32, device="cpu", progress=False)
    assert manifest.config["act_power"] == 0.5
    with safe_open(out / "calibration_ids.safetensors", framework="pt") as handle:
        ids = handle.get_tensor("input_ids")
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    block, squares = dense.model.layers[0], {}

    def add(name, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        squares[name] = squares.get(name, 0) + (x * x).sum(0)

    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: add(n, args))
             for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        dense.model(input_ids=ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(squares) == 7
    for name, sq in squares.items():
        w = block.get_submodule(name).weight.detach().abs()
        score = (w / w.sum(0) + w / w.sum(1, keepdim=True)) * sq.sqrt() ** 0.5
        k = int(0.6 * score.numel())
        expected = torch.ones(score.numel(), dtype=torch.bool)
        expected[torch.argsort(score.flatten(), stable=True)[:k]] = False
        key = f"model.layers.0.{name}.weight"
        with safe_open(out / index[key], framework="pt") as handle:
            written = handle.get_tensor(key)
        assert torch.equal(written != 0, expected.reshape(score.shape)), name
        assert manifest.sparsity[key] == round(k / score.numel(), 6)
