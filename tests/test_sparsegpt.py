"""SparseGPT and --reconstruct: hand-made cases where the plausible wrong versions disagree, a whole-model
float64 reference written independently (tools/reference_prune.py), and the output error they lower."""

import json

import pytest
import torch
from reference_prune import reference_sparsegpt
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

import streamprune
from streamprune.data import WIKITEXT_CALIBRATION
from streamprune.obs import obs_prune
from streamprune.stats import input_statistics

WIKI = str(WIKITEXT_CALIBRATION)
F64 = torch.float64


def tensors(directory, names=None):
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name, file in index.items():
        if names is None or name in names:
            with safe_open(directory / file, framework="pt") as handle:
                out[name] = handle.get_tensor(name)
    return out


def calibration_ids(out):
    with safe_open(out / "calibration_ids.safetensors", framework="pt") as handle:
        return handle.get_tensor("input_ids")


# -- the statistics ----------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.o = nn.Linear(3, 2, bias=False), nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False)

    def forward(self, x):
        return self.o(self.q(x) * self.k(x))


def test_the_gram_matrix_is_x_transpose_x_over_all_tokens_and_shared_by_linears_fed_one_tensor():
    module = _Attention().double()
    x1 = torch.tensor([[[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]]], dtype=F64)  # batch 1, 2 tokens
    x2 = torch.tensor([[[2.0, 0.0, 1.0]]], dtype=F64)
    with torch.no_grad(), input_statistics(module, needs=("gram",)) as statistics:
        module(x1)
        module(x2)
    tokens = torch.cat([x1.reshape(-1, 3), x2.reshape(-1, 3)])
    assert torch.equal(statistics["q"].gram, tokens.T @ tokens)
    assert statistics["k"].gram is statistics["q"].gram  # one matrix for q and k, not two
    assert statistics["o"].gram is not statistics["q"].gram and statistics["o"].gram.shape == (2, 2)
    assert statistics["q"].tokens == 3 and torch.equal(statistics["q"].abs_sum, torch.zeros(3, dtype=F64))  # norms not asked


# -- the OBS update on hand-made inputs ---------------------------------------------------------------


def test_the_mask_is_chosen_per_column_block_not_per_row():
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    new, keep = obs_prune(weight, torch.eye(2, dtype=F64), sparsity=0.5, blocksize=2)
    # saliency w^2 / [H^-1]_jj^2 = 1.01 w^2: the 2 smallest of the block are both in row 0 (per row: 1 and 3)
    assert keep.tolist() == [[False, False], [True, True]]
    assert new.tolist() == [[0.0, 0.0], [3.0, 4.0]]  # H diagonal: nothing to compensate
    new, keep = obs_prune(weight, torch.eye(2, dtype=F64), sparsity=0.5, blocksize=1)  # blocks of one column
    assert keep.tolist() == [[False, False], [True, True]]


def test_the_damping_enters_the_compensation():
    x = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=F64)  # H = [[1, 1], [1, 2]], mean diagonal 1.5
    weight = torch.tensor([[0.1, 5.0]], dtype=F64)
    # OBS: removing w0 moves w1 by w0 H01 / H11, with H11 damped by 0.01 * 1.5
    new, keep = obs_prune(weight, x.T @ x, sparsity=0.5, blocksize=2)
    assert keep.tolist() == [[False, True]]
    assert new[0, 0] == 0 and new[0, 1].item() == pytest.approx(5 + 0.1 / 2.015, abs=1e-14)
    undamped, _ = obs_prune(weight, x.T @ x, sparsity=0.5, blocksize=2, percdamp=0.0)
    assert undamped[0, 1].item() == pytest.approx(5 + 0.1 / 2, abs=1e-14)


def test_dead_inputs_are_zeroed_and_do_not_break_the_inverse():
    x = torch.tensor([[1.0, 0.0, 2.0, 1.0], [0.5, 0.0, 1.0, 3.0], [2.0, 0.0, 0.0, 1.0]], dtype=F64)  # input 1 never used
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64)
    new, keep = obs_prune(weight, x.T @ x, sparsity=0.25, blocksize=4)
    # the dead column is zeroed first, so it is the one pruned, and its zero error moves nothing
    assert new.tolist() == [[1.0, 0.0, 3.0, 4.0]] and keep.tolist() == [[True, False, True, True]]


def test_pruned_columns_carry_the_updates_they_received():
    torch.manual_seed(0)
    x = torch.randn(20, 3, dtype=F64) @ torch.tensor([[1.0, 0.6, 0.3], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]], dtype=F64)
    gram = x.T @ x
    weight = torch.tensor([[1.0, 1.0, 10.0]], dtype=F64)
    new, keep = obs_prune(weight, gram, sparsity=2 / 3, blocksize=3)
    assert keep.tolist() == [[False, False, True]]
    # the last weight, the only one kept, ends at the least-squares optimum for the damped H:
    # w2' = w . H[:, 2] / H22.  Taking w1's error from its value before w0's update does not get there.
    damped = gram + 0.01 * torch.diag(gram).mean() * torch.eye(3, dtype=F64)
    assert new[0, 2].item() == pytest.approx((weight[0] @ damped[:, 2] / damped[2, 2]).item(), rel=1e-12)


def test_a_held_mask_is_kept_and_lowers_the_output_error():
    torch.manual_seed(1)
    x = torch.randn(64, 8, dtype=F64) @ (torch.eye(8, dtype=F64) + 0.3 * torch.randn(8, 8, dtype=F64))
    weight = torch.randn(4, 8, dtype=F64)
    keep = torch.rand(4, 8) > 0.5
    new, kept = obs_prune(weight, x.T @ x, keep=keep, blocksize=3)
    assert torch.equal(kept, keep) and torch.all(new[~keep] == 0)
    masked = weight * keep
    assert ((weight - new) @ x.T).square().sum() < ((weight - masked) @ x.T).square().sum()


# -- the whole model against the independent reference ---------------------------------------------------


@pytest.mark.parametrize(
    "family, options",
    [
        ("llama", {"sparsity": 0.5, "blocksize": 32}),
        ("mistral", {"sparsity": 0.6}),
        ("qwen2", {"pattern": "2:4", "blocksize": 16}),
        ("qwen3", {"sparsity": 0.5, "percdamp": 0.1, "blocksize": 48}),
        ("phi3", {"sparsity": 0.5, "blocksize": 32}),  # fused qkv_proj and gate_up_proj
        ("gpt_neox", {"pattern": "4:8"}),  # fused query_key_value, parallel residual, hub names
    ],
)
def test_streamed_sparsegpt_equals_the_whole_model_reference(tiny_checkpoint, tmp_path, family, options):
    model_dir = tiny_checkpoint(family)  # float64, blocks split across shard files
    out = tmp_path / "out"
    manifest = streamprune.prune(model_dir, out, method="sparsegpt", calib=WIKI, nsamples=5, seqlen=32, batch_size=2,
                                 device="cpu", progress=False, **options)
    config = manifest.config
    reference = reference_sparsegpt(model_dir, calibration_ids(out), config["sparsity"], config["pattern"],
                                    config["blocksize"], config["percdamp"])
    streamed = tensors(out, reference)
    assert len(reference) == len(manifest.sparsity) == {"phi3": 4, "gpt_neox": 4}.get(family, 7) * 3
    for name, weight in reference.items():
        assert torch.equal(streamed[name] != 0, weight != 0), name  # the same mask
        assert torch.allclose(streamed[name], weight, rtol=1e-9, atol=1e-12), name  # the same updates
    for name, fraction in manifest.sparsity.items():  # floor(s x entries) per column block
        assert config["sparsity"] - 0.001 < fraction <= config["sparsity"] + 1e-9, name
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=F64)
    down = {"phi3": "model.layers.2.mlp.down_proj.weight", "gpt_neox": "gpt_neox.layers.2.mlp.dense_4h_to_h.weight"}
    name = down.get(family, "model.layers.2.mlp.down_proj.weight")
    assert torch.equal(reloaded.state_dict()[name], streamed[name])


def test_reconstruction_holds_each_mask_and_equals_the_reference(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("llama")
    common = dict(calib=WIKI, nsamples=5, seqlen=32, batch_size=2, device="cpu", progress=False)
    masked = streamprune.prune(model_dir, tmp_path / "mask", method="wanda", **common)
    rebuilt = streamprune.prune(model_dir, tmp_path / "rebuilt", method="wanda", reconstruct=True, blocksize=40, **common)
    assert rebuilt.config["reconstruct"] and rebuilt.sparsity == masked.sparsity  # row promise kept
    mask_only, updated = tensors(tmp_path / "mask"), tensors(tmp_path / "rebuilt")
    # block 0 sees the same dense inputs in both runs: the same masks, other kept values
    for name in [n for n in mask_only if n.startswith("model.layers.0.") and n.endswith("proj.weight")]:
        assert torch.equal(mask_only[name] != 0, updated[name] != 0), name
        assert not torch.equal(mask_only[name], updated[name]), name
    reference = reference_sparsegpt(
        model_dir, calibration_ids(tmp_path / "rebuilt"), 0.5, blocksize=40, percdamp=0.01,
        masks_from={name: tensors(tmp_path / "rebuilt", [name])[name] != 0 for name in mask_only if "proj" in name},
    )
    for name, weight in reference.items():
        assert torch.allclose(updated[name], weight, rtol=1e-9, atol=1e-12), name


def test_reconstruction_lowers_every_linear_output_error_of_the_first_block(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("mistral")
    common = dict(calib=WIKI, nsamples=4, seqlen=32, device="cpu", progress=False, method="en-modified", alpha=0.5)
    streamprune.prune(model_dir, tmp_path / "mask", **common)
    streamprune.prune(model_dir, tmp_path / "rebuilt", reconstruct=True, **common)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=F64)
    inputs = {}
    block = dense.model.layers[0]

    def keep_input(name, args):
        inputs[name] = args[0].reshape(-1, args[0].shape[-1])

    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: keep_input(n, args))
             for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        dense.model(input_ids=calibration_ids(tmp_path / "mask"), use_cache=False)
    for hook in hooks:
        hook.remove()
    mask_only, rebuilt = tensors(tmp_path / "mask"), tensors(tmp_path / "rebuilt")
    assert len(inputs) == 7
    for name, x in inputs.items():
        key = f"model.layers.0.{name}.weight"
        w = block.get_submodule(name).weight.detach()
        error = {run: ((w - weights[key]) @ x.T).square().sum().item() for run, weights in (("mask", mask_only), ("rebuilt", rebuilt))}
        assert error["rebuilt"] < error["mask"], (name, error)
