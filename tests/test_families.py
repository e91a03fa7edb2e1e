"""Every tested family end to end on a tiny random checkpoint: streamed blocks and logits equal the whole
model's, masks equal the whole-model reference, streamed perplexity equals transformers', and the
output reloads with from_pretrained, every tensor present and nothing but block linears changed.

The checkpoints are written under the names checkpoints on the hub use (Pythia's embed_out, Gemma 3's
language_model.model.*), their blocks split across shard files, with each family's sliding windows,
local/global layers, logit and embedding scales set (tools/make_checkpoint.py FAMILY_SETTINGS).
"""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from make_checkpoint import FAMILIES
from reference_prune import reference_masks
from test_streaming import calibration_ids, read_all
from transformers import AutoModelForCausalLM

import streamprune
from streamprune.cli import main
from streamprune.data import WIKITEXT_CALIBRATION, WIKITEXT_HELD_OUT
from streamprune.evaluate.loglikelihood import streamed_logprobs
from streamprune.evaluate.perplexity import perplexity
from streamprune.families import TESTED
from streamprune.loading import open_model


def test_every_tested_family_has_a_tiny_checkpoint_and_the_other_way_round():
    assert sorted(TESTED) == FAMILIES


def _linear_weights(model) -> set[str]:
    """State-dict names of the nn.Linear weights inside the decoder blocks, by hand per layout."""
    decoder = {"opt": "model.decoder", "gpt_neox": "gpt_neox", "gemma3": "model.language_model"}.get(model.config.model_type, "model")
    return {f"{decoder}.layers.{i}.{name}.weight" for i, layer in enumerate(model.get_submodule(decoder).layers)
            for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_streams_prunes_evaluates_and_reloads(tiny_checkpoint, tmp_path, family):
    model_dir = tiny_checkpoint(family, tie_embeddings=None)  # the family's own tying
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dense(input_ids=ids, output_hidden_states=True)

    # 1. blocks one at a time see what they see inside the whole model; logits by the model's own code
    stack = open_model(model_dir, device="cpu").stack
    acts = stack.embed(ids, batch_size=2)
    torch.testing.assert_close(acts.hidden.read(0, 3), expected.hidden_states[0], rtol=0, atol=0)
    for index in range(stack.num_blocks):
        stack.load_block(index)
        stack.run_block(index, acts, batch_size=2, write_back=True)
        stack.free_block(index)
        if index + 1 < stack.num_blocks:  # the last entry of hidden_states is after the final norm
            torch.testing.assert_close(acts.hidden.read(0, 3), expected.hidden_states[index + 1], rtol=1e-12, atol=1e-12)
    with stack.output_head() as logits_of:
        for row in range(3):
            torch.testing.assert_close(logits_of(acts.hidden.read(row, row + 1)[0]), expected.logits[row], rtol=1e-10, atol=1e-10)
        # packed positions of many rows in one call: more (360) than OPT's learned position table holds
        packed = acts.hidden.read(0, 3).flatten(0, 1).repeat(5, 1)
        torch.testing.assert_close(logits_of(packed), expected.logits.flatten(0, 1).repeat(5, 1), rtol=1e-10, atol=1e-10)

    # 2. masks equal the independent whole-model reference
    out = tmp_path / "out"
    manifest = streamprune.prune(model_dir, out, method="wanda", sparsity=0.5, calib=str(WIKITEXT_CALIBRATION),
                                 nsamples=4, seqlen=32, batch_size=2, device="cpu", progress=False)
    reference = reference_masks(model_dir, calibration_ids(out), "wanda", 0.0, 0.5, dtype=torch.float64)
    assert set(reference) == set(manifest.sparsity) and len(reference) == len(_linear_weights(dense))
    written = read_all(out)
    for name, keep in reference.items():
        assert torch.equal(written[name] != 0, keep), name

    # 3. the output reloads as the same class; only block linears changed, nothing missing
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    assert type(pruned) is type(dense)
    original = read_all(model_dir)
    assert written.keys() == original.keys()
    for name, tensor in original.items():
        if name not in reference:
            assert torch.equal(written[name], tensor), name
    changed = {name for name, p in pruned.state_dict().items() if not torch.equal(p, dense.state_dict()[name])}
    assert changed == _linear_weights(dense)

    # 4. streamed perplexity of the pruned checkpoint equals transformers' whole-model perplexity
    opened = open_model(out, device="cpu")
    text = WIKITEXT_HELD_OUT.read_text()
    result = perplexity(lambda requests: streamed_logprobs(opened.stack, requests, batch_size=2),
                        opened.tokenizer, text, seqlen=32, max_windows=3)
    windows = torch.tensor(opened.tokenizer(text)["input_ids"][: 3 * 32]).view(3, 32)
    with torch.no_grad():  # transformers' own loss upcasts to float32, so the float64 logits are scored here
        log_probs = pruned(input_ids=windows).logits[:, :-1].log_softmax(dim=-1)
    nll = -log_probs.gather(-1, windows[:, 1:, None]).mean().item()
    assert result.value == pytest.approx(math.exp(nll), rel=1e-10)


def _hub_vision_names(source, target):
    """A copy whose vision tensors are named as in the hub's Gemma 3 checkpoints (vision_tower.vision_model.*),
    which transformers renames while loading (save_pretrained writes them without vision_model)."""
    from safetensors.torch import load_file, save_file

    target.mkdir()
    for path in source.iterdir():
        if path.suffix != ".safetensors":
            (target / path.name).write_bytes(path.read_bytes())
    index = json.loads((source / "model.safetensors.index.json").read_text())
    renamed = {}
    for name in sorted(set(index["weight_map"].values())):
        tensors = {("vision_tower.vision_model." + k.removeprefix("vision_tower.") if k.startswith("vision_tower.") else k): t
                   for k, t in load_file(source / name).items()}
        save_file(tensors, target / name, metadata={"format": "pt"})
        renamed.update(dict.fromkeys(tensors, name))
    (target / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": renamed}))
    return target


def test_gemma3_multimodal_keeps_its_vision_tower_and_loads_as_itself(tiny_checkpoint, tmp_path):
    model_dir = _hub_vision_names(tiny_checkpoint("gemma3", tie_embeddings=None), tmp_path / "model")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("language_model.model.layers.") for k in index)  # the hub's names
    assert any(k.startswith("vision_tower.vision_model.") for k in index)
    out = tmp_path / "out"
    manifest = streamprune.prune(model_dir, out, method="sparsegpt", sparsity=0.5, calib=str(WIKITEXT_CALIBRATION),
                                 nsamples=4, seqlen=32, device="cpu", progress=False)
    assert all(k.startswith("language_model.model.layers.") for k in manifest.sparsity)
    written, original = read_all(out), read_all(model_dir)
    vision = [k for k in original if k.startswith(("vision_tower.vision_model.", "multi_modal_projector."))]
    assert vision and all(torch.equal(written[k], original[k]) for k in vision)
    from transformers import Gemma3ForConditionalGeneration

    models = [Gemma3ForConditionalGeneration.from_pretrained(d, dtype=torch.float64, output_loading_info=True) for d in (model_dir, out)]
    for _, info in models:
        assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():  # the vision side of the pruned model is the dense one's
        dense_image, pruned_image = (model.get_image_features(pixel_values=pixels).pooler_output for model, _ in models)
    torch.testing.assert_close(pruned_image, dense_image, rtol=0, atol=0)


def test_families_command_lists_what_is_tested_and_the_readme_shows_it():
    from pathlib import Path

    from streamprune.cli import families_table

    assert families_table() in (Path(__file__).parents[1] / "README.md").read_text()  # regenerate: streamprune families
    result = CliRunner().invoke(main, ["families"])
    assert result.exit_code == 0
    for model_type, what in TESTED.items():
        assert f"| `{model_type}` | {what} |" in result.output


@pytest.mark.parametrize("model_type, extra, fragments", [
    ("qwen3_moe", {}, ["qwen3_moe is not supported", "model.layers.0.mlp.experts.gate_up_proj", "fused mixture-of-experts"]),
    # a dense first block before expert blocks (as DeepSeek's first_k_dense_replace): every block is checked
    ("qwen3_moe", {"mlp_only_layers": [0]}, ["model.layers.1.mlp.experts.gate_up_proj", "fused mixture-of-experts"]),
    ("gpt2", {}, ["gpt2 is not supported", "transformer.h.0.attn.c_attn.weight", "Conv1D"]),
])
def test_structures_that_do_not_fit_are_refused_naming_the_part(tmp_path, model_type, extra, fragments):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, num_hidden_layers=2, hidden_size=32, intermediate_size=64, moe_intermediate_size=32,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=300, num_experts=4,
                                  num_experts_per_tok=2, n_embd=32, n_layer=2, n_head=4, **extra)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    result = CliRunner().invoke(main, ["prune", str(tmp_path / "model"), str(tmp_path / "out"), "--quiet"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert not (tmp_path / "out").exists()
