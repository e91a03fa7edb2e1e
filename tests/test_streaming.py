"""Streamed pruning against an independent whole-model reference, on tiny random checkpoints."""

import json

import pytest
import torch
from reference_prune import pruned_masks, reference_masks
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import streamprune
from streamprune.data import WIKITEXT_CALIBRATION
from streamprune.loading import open_model

WIKI = str(WIKITEXT_CALIBRATION)


def read_all(directory):
    index_file = directory / "model.safetensors.index.json"
    if index_file.exists():
        files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(directory / name, framework="pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    return tensors


def calibration_ids(out):
    with safe_open(out / json.loads((out / "streamprune.json").read_text())["calibration_ids"], framework="pt") as f:
        return f.get_tensor("input_ids")


@pytest.mark.parametrize(
    "family, method, alpha, options",
    [
        ("llama", "en-modified", 0.5, {}),
        ("llama", "en-original", 0.25, {"stat_norm": "sum"}),
        ("llama", "wanda", 0.0, {"pattern": "2:4"}),
        ("llama", "magnitude", 0.0, {"sparsity": 0.7}),
        ("mistral", "en-modified", 0.75, {}),
        ("qwen2", "en-original", 0.5, {"pattern": "4:8"}),
        ("qwen3", "wanda", 0.0, {"sparsity": 0.6}),
    ],
)
def test_streamed_masks_equal_the_whole_model_reference(tiny_checkpoint, tmp_path, family, method, alpha, options):
    model_dir = tiny_checkpoint(family)
    out = tmp_path / "out"
    method_options = {"alpha": alpha} if method.startswith("en-") else {}
    manifest = streamprune.prune(
        model_dir, out, method=method, calib=WIKI, nsamples=5, seqlen=32, batch_size=2,
        device="cpu", progress=False, **options, **method_options,
    )
    config = manifest.config
    ids = calibration_ids(out)
    if method == "magnitude":  # no block runs, so no text was drawn; the reference's scores ignore the text
        assert ids.shape[0] == 0
        ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    reference = reference_masks(
        model_dir, ids, method, alpha, config["sparsity"], config["pattern"], config["stat_norm"], dtype=torch.float64,
    )
    streamed = pruned_masks(out, reference)
    assert len(reference) == 7 * 3
    for name in reference:
        assert torch.equal(streamed[name], reference[name]), name


def test_output_reloads_and_keeps_everything_else_bit_for_bit(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("llama", dtype="bfloat16", tie_embeddings=True)
    out = tmp_path / "out"
    manifest = streamprune.prune(
        model_dir, out, method="en-modified", alpha=0.5, sparsity=0.5, calib=WIKI, nsamples=4, seqlen=16,
        device="cpu", dtype="float32", progress=False,
    )
    dense, pruned = read_all(model_dir), read_all(out)
    assert dense.keys() == pruned.keys()
    for name, tensor in dense.items():
        assert pruned[name].dtype == torch.bfloat16
        if name in manifest.sparsity:
            kept = pruned[name] != 0
            assert torch.equal(pruned[name][kept], tensor[kept]), name
            zeros_per_row = (~kept).sum(dim=1)
            assert torch.all(zeros_per_row == tensor.shape[1] // 2), name
        else:
            assert torch.equal(pruned[name], tensor), name
    assert set(manifest.sparsity) == {k for k in dense if ".layers." in k and "proj" in k}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def test_a_lossy_compute_dtype_never_changes_kept_weights(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("qwen2", dtype="float32")  # q/k/v biases too
    out = tmp_path / "out"
    manifest = streamprune.prune(model_dir, out, calib=WIKI, nsamples=3, seqlen=16, dtype="bfloat16", progress=False)
    assert manifest.dtype == "bfloat16"
    dense, pruned = read_all(model_dir), read_all(out)
    for name, tensor in dense.items():
        assert pruned[name].dtype == torch.float32
        if name in manifest.sparsity:
            kept = pruned[name] != 0
            assert torch.equal(pruned[name][kept], tensor[kept]) and (~kept).sum() == tensor.numel() // 2, name
        else:
            assert torch.equal(pruned[name], tensor), name


def test_float16_checkpoints_compute_in_float32_on_a_cpu(tiny_checkpoint):
    assert open_model(tiny_checkpoint("llama", dtype="float16"), device="cpu").stack.dtype == torch.float32
    assert open_model(tiny_checkpoint("llama", dtype="bfloat16"), device="cpu").stack.dtype == torch.bfloat16


def test_manifest_records_the_run(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    streamprune.prune(tiny_checkpoint("llama"), out, calib=WIKI, nsamples=3, calib_mult=2, seqlen=16, seed=7, progress=False)
    manifest = json.loads((out / "streamprune.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["blocks_done"] == manifest["blocks_total"] == 3
    assert manifest["config"]["seed"] == 7 and manifest["config"]["method"] == "en-modified"
    assert calibration_ids(out).shape == (6, 16)
    assert manifest["timings"]["total_s"] > 0 and len(manifest["timings"]["blocks_s"]) == 3
    assert manifest["peak_memory"]["host_rss_bytes"] > 0
    assert set(manifest["versions"]) >= {"streamprune", "torch", "transformers"}
    assert all(value == 0.5 for value in manifest["sparsity"].values())


def test_same_seed_same_checkpoint_other_seed_other_windows(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("llama")
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        streamprune.prune(model_dir, tmp_path / name, calib=WIKI, nsamples=2, seqlen=16, seed=seed, progress=False)
        runs[name] = read_all(tmp_path / name)
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not torch.equal(calibration_ids(tmp_path / "a"), calibration_ids(tmp_path / "c"))


