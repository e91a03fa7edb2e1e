"""The real model: SmolLM2-135M-Instruct (30 LLaMA blocks, hidden 576, GQA 9/3 heads, tied embeddings)."""

import json

import pytest
import torch
from reference_prune import agreement, pruned_masks, reference_masks
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import streamprune
from streamprune.data import WIKITEXT_CALIBRATION
from streamprune.masking import zero_fraction

pytestmark = pytest.mark.slow


def run(smollm2, out, **options):
    settings = dict(calib=str(WIKITEXT_CALIBRATION), nsamples=4, seqlen=128, device="cpu", dtype="float32", progress=False)
    settings.update(options)
    return streamprune.prune(smollm2, out, **settings)


def block_tensors(directory, block):
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for name, file in index.items():
        if name.startswith(f"model.layers.{block}."):
            with safe_open(directory / file, framework="pt") as handle:
                tensors[name] = handle.get_tensor(name)
    return tensors


def test_pruned_smollm2_matches_the_whole_model_reference_and_reloads(smollm2, tmp_path):
    out = tmp_path / "en-modified"
    manifest = run(smollm2, out, method="en-modified", alpha=0.0, sparsity=0.5)
    assert manifest.status == "complete" and manifest.blocks_done == 30
    with safe_open(out / "calibration_ids.safetensors", framework="pt") as handle:
        ids = handle.get_tensor("input_ids")
    reference = reference_masks(smollm2, ids, "en-modified", 0.0, 0.5, blocks=3)
    share, per_tensor = agreement(reference, pruned_masks(out, reference))
    assert share >= 0.999, per_tensor
    assert len(manifest.sparsity) == 30 * 7
    for name, fraction in manifest.sparsity.items():
        assert fraction == 0.5, name
    for tensor in block_tensors(out, 29).values():
        if tensor.ndim == 2:
            assert torch.all((tensor == 0).sum(dim=1) == tensor.shape[1] // 2)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    with torch.no_grad():
        logits = model(input_ids=ids[:1, :32]).logits
    assert torch.isfinite(logits).all()


def test_method_identities_hold_on_the_real_model(smollm2, tmp_path):
    options = dict(nsamples=2, seqlen=64)
    runs = {
        name: run(smollm2, tmp_path / name, method=method, **options, **({"alpha": alpha} if method.startswith("en-") else {}))
        for name, method, alpha in [
            ("wanda", "wanda", 0.0),
            ("enm0", "en-modified", 0.0),
            ("eno0", "en-original", 0.0),
            ("eno1", "en-original", 1.0),
            ("enm1", "en-modified", 1.0),
        ]
    }
    for block in (0, 17):
        t = {name: block_tensors(tmp_path / name, block) for name in runs}
        linears = sorted(k for k in t["wanda"] if k.endswith("proj.weight"))
        assert len(linears) == 7 and all(t[name].keys() == t["wanda"].keys() for name in t)
        assert all(zero_fraction(t["wanda"][k]) == 0.5 for k in linears)  # they are pruned, not copies
        assert all(torch.equal(t["wanda"][k], t["enm0"][k]) for k in t["wanda"])
        assert all(torch.equal(t["eno1"][k], t["enm1"][k]) for k in t["eno1"])
        # the identities are not trivial: squared L2 (en-original at 0) and L1 (a = 1) prune otherwise
        assert not any(torch.equal(t["wanda"][k], t["eno0"][k]) for k in linears)
        assert not any(torch.equal(t["wanda"][k], t["eno1"][k]) for k in linears)




def test_streamed_perplexity_equals_the_whole_model_dense_and_pruned(smollm2, tmp_path):
    from streamprune.data import WIKITEXT_HELD_OUT
    from streamprune.evaluate.perplexity import text_windows
    from streamprune.evaluate.runner import evaluate

    pruned = tmp_path / "pruned"
    run(smollm2, pruned, method="en-modified", alpha=0.5, sparsity=0.5)
    values = {}
    for name, model_dir in (("dense", smollm2), ("pruned", pruned)):
        streamed = evaluate(model_dir, ppl=str(WIKITEXT_HELD_OUT), seqlen=128, max_windows=3, device="cpu",
                            dtype="float32", batch_size=2, progress=False)["ppl"]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        from transformers import AutoTokenizer

        windows = text_windows(AutoTokenizer.from_pretrained(model_dir), WIKITEXT_HELD_OUT.read_text(), 128, 3)
        with torch.no_grad():
            loss = model(input_ids=windows, labels=windows).loss  # mean NLL over the same predicted tokens
        assert streamed["windows"] == 3 and streamed["tokens"] == 3 * 127
        assert streamed["value"] == pytest.approx(torch.exp(loss).item(), rel=1e-4)
        values[name] = streamed["value"]
    assert 5 < values["dense"] < values["pruned"] < 10 * values["dense"]


def test_fifty_examples_per_task_beat_chance_where_the_model_can(smollm2):
    """(That the scores do not depend on the batch size is the next test's, on fewer examples.)"""
    from pathlib import Path

    from streamprune.evaluate.runner import evaluate

    data = Path(__file__).parent / "data"
    tasks = evaluate(smollm2, tasks=("boolq", "hellaswag", "phishing"), limit=50, data_dir=str(data), device="cpu",
                     dtype="float32", batch_size=8, progress=False)["tasks"]
    assert [tasks[name]["n"] for name in ("boolq", "hellaswag", "phishing")] == [50, 50, 50]
    assert tasks["hellaswag"]["acc_norm"] > 0.3  # 4 choices: chance is 0.25
    assert tasks["phishing"]["share_phishing"] == pytest.approx(0.56)


def test_task_scores_do_not_depend_on_the_batch_size(smollm2):
    from pathlib import Path

    from streamprune.evaluate.tasks import get_task, requests_for, subset
    from streamprune.loading import open_model
    from streamprune.evaluate.loglikelihood import streamed_logprobs

    opened = open_model(smollm2, device="cpu", dtype="float32")
    requests = []
    for name in ("boolq", "hellaswag", "phishing"):
        examples = subset(get_task(name).load(Path(__file__).parent / "data"), 6)
        requests += requests_for(examples, opened.tokenizer, 8192)
    small = streamed_logprobs(opened.stack, requests, batch_size=1)
    large = streamed_logprobs(opened.stack, requests, batch_size=7, max_resident_tokens=2000)
    for a, b in zip(small, large):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_killed_after_a_third_of_the_blocks_resumes_bitwise_identical(smollm2, tmp_path):
    import hashlib
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    from streamprune.cli import main

    def args(out):
        return ["prune", str(smollm2), str(out), "--method", "en-original", "--alpha", "0.25", "--sparsity", "0.6",
                "--calib", str(WIKITEXT_CALIBRATION), "--nsamples", "4", "--seqlen", "64", "--device", "cpu",
                "--dtype", "float32", "--quiet"]

    def hashes(directory):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
                if p.is_file() and p.name != "streamprune.json"}

    assert CliRunner().invoke(main, args(tmp_path / "uninterrupted")).exit_code == 0
    out = tmp_path / "resumed"
    kill_at = Path(__file__).parent / "kill_at.py"
    killed = subprocess.run([sys.executable, str(kill_at), "after_block", "10", *args(out)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((out / "streamprune.json").read_text())["blocks_done"] == 10
    result = CliRunner().invoke(main, args(out))
    assert result.exit_code == 0 and "10 of its 30 blocks are done" in result.stderr
    assert hashes(out) == hashes(tmp_path / "uninterrupted")
    assert len([name for name in hashes(out) if name.startswith("model-")]) == 31


def test_sparsegpt_two_four_on_the_real_model(smollm2, tmp_path):
    from reference_prune import reference_sparsegpt

    out = tmp_path / "sparsegpt"
    manifest = run(smollm2, out, method="sparsegpt", pattern="2:4", nsamples=4, seqlen=64)
    # at least half of each weight, and hardly more: an updated weight may round to an exact 0 on writing
    assert manifest.status == "complete" and all(0.5 <= v < 0.5001 for v in manifest.sparsity.values())
    for tensor in block_tensors(out, 29).values():
        if tensor.ndim == 2:  # 2 of every 4 inputs of a row, whatever the OBS updates did to the rest
            assert torch.all((tensor.reshape(tensor.shape[0], -1, 4) == 0).sum(dim=2) >= 2)
    with safe_open(out / "calibration_ids.safetensors", framework="pt") as handle:
        ids = handle.get_tensor("input_ids")
    reference = reference_sparsegpt(smollm2, ids, 0.5, "2:4", blocks=1)  # float64, unblocked
    written = block_tensors(out, 0)
    agree = sum((written[n] != 0).eq(w != 0).sum().item() for n, w in reference.items())
    assert agree / sum(w.numel() for w in reference.values()) > 0.999  # float32 against float64
    # (--reconstruct runs the same OBS update with a held mask: tests/test_sparsegpt.py checks it against
    # the reference in float64 on tiny checkpoints; its float32 run on these weights, a second 30-block
    # OBS pass as long as this one, is left out for the suite's time)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids[:1, :32]).logits).all()
