"""OWL layer-wise budgets: the mapping, the outlier ratios against a whole-model computation, the pruned
output's per-block sparsity, bitwise resume from either pass, and the refusals."""

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from streamprune.budgets import outlier_ratio, owl_sparsities
from streamprune.cli import main
from streamprune.data import WIKITEXT_CALIBRATION
from streamprune.errors import StreamPruneError

KILL_AT = Path(__file__).parent / "kill_at.py"


def test_owl_mapping_on_hand_made_ratios():
    # d = 2 lambda (D - min) / (max - min) = [0, .064, .032, .16], mean .064; s_l = s - (d - mean d)
    budgets = owl_sparsities([0.01, 0.03, 0.02, 0.06], sparsity=0.7, lam=0.08)
    assert budgets == pytest.approx([0.764, 0.7, 0.732, 0.604], abs=1e-12)
    assert sum(budgets) / 4 == pytest.approx(0.7, abs=1e-12) and max(budgets) - min(budgets) == pytest.approx(0.16, abs=1e-12)
    assert budgets.index(min(budgets)) == 3  # the most outliers: the least pruned
    assert owl_sparsities([0.02, 0.02, 0.02], 0.5, 0.08) == [0.5, 0.5, 0.5]  # nothing to tell the blocks apart
    with pytest.raises(StreamPruneError, match=r"--owl-lambda 0.3 around --sparsity 0.9 gives a block a sparsity of 1.2000, outside \[0, 1\); lower --owl-lambda"):
        owl_sparsities([0.0, 1.0], 0.9, 0.3)


def test_outlier_ratio_pools_a_blocks_scores_and_counts_strictly_above():
    a, b = torch.full((1, 4), 4.0), torch.ones(1, 4)
    # pooled mean 2.5: at M = 1.5 the threshold is 3.75, all of a is above it (each tensor's own mean would count none)
    assert outlier_ratio([a, b], 1.5) == 0.5
    assert outlier_ratio([a, b], 1.6) == 0.0  # threshold exactly 4: not above
    assert outlier_ratio([torch.tensor([[1.0, 1.0, 1.0, 9.0]])], 2.0) == 0.25


def prune_args(model, out, *extra):
    return ["prune", str(model), str(out), "--method", "wanda", "--sparsity", "0.6", "--budgets", "owl",
            "--owl-lambda", "0.1", "--calib", str(WIKITEXT_CALIBRATION), "--nsamples", "4", "--seqlen", "24",
            "--batch-size", "3", "--quiet", *extra]


def whole_model_outlier_ratios(model_dir, ids, m):
    """OWL's ratios computed independently: the whole model in float64, a hook on every linear of every
    block summing its inputs' squares over all calibration tokens, Wanda's score, pooled per block."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float64)
    sums, hooks = {}, []
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            def hook(mod, inputs, output, name=name):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    ratios = []
    for index, layer in enumerate(model.model.layers):
        scores = [module.weight.abs() * sums[f"{index}.{name}"].sqrt()
                  for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)]
        pooled = torch.cat([s.flatten() for s in scores])
        ratios.append(int((pooled > m * pooled.mean()).sum()) / pooled.numel())
    return ratios


def file_hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())
            if p.is_file() and p.name != "streamprune.json"}


@pytest.fixture(scope="module")
def owl_run(tiny_checkpoint, tmp_path_factory):
    model = tiny_checkpoint("llama", dtype="float64", layers=4)
    out = tmp_path_factory.mktemp("owl") / "out"
    result = CliRunner().invoke(main, prune_args(model, out))
    assert result.exit_code == 0, result.output
    return model, out


def test_owl_ratios_equal_a_whole_model_computation_and_each_block_gets_its_budget(owl_run):
    model, out = owl_run
    manifest = json.loads((out / "streamprune.json").read_text())
    saved = json.loads((out / "budgets.json").read_text())
    assert manifest["budgets"] == saved and saved["budgets"] == "owl" and saved["owl_m"] == 5 and saved["owl_lambda"] == 0.1
    with safe_open(out / "calibration_ids.safetensors", framework="pt") as handle:
        ids = handle.get_tensor("input_ids")
    assert saved["outlier_ratios"] == whole_model_outlier_ratios(model, ids, 5.0)
    assert saved["sparsities"] == owl_sparsities(saved["outlier_ratios"], 0.6, 0.1)
    assert len(set(saved["sparsities"])) == 4  # the blocks do differ
    for index, target in enumerate(saved["sparsities"]):
        names = [k for k in manifest["sparsity"] if k.startswith(f"model.layers.{index}.")]
        with safe_open(next(out.glob(f"model-{index + 1:05d}-*.safetensors")), framework="pt") as handle:
            for name in names:
                weight = handle.get_tensor(name)
                zeros = (weight == 0).sum(dim=1)
                assert torch.all(zeros == int(target * weight.shape[1])), (name, target)
    mean = sum(manifest["sparsity"].values()) / len(manifest["sparsity"])
    assert abs(mean - 0.6) < 0.03  # block means are 0.6 exactly; rows round down
    report = CliRunner().invoke(main, ["inspect", str(out)])
    assert report.exit_code == 0 and "OWL budget" in report.output and f"{saved['sparsities'][0]:.2%}" in report.output


@pytest.mark.parametrize("point, n", [("run_block", 3), ("after_block", 2)])  # in the first pass; in the second
def test_a_killed_owl_run_resumes_bitwise(owl_run, tmp_path, point, n):
    model, reference = owl_run
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, str(KILL_AT), point, str(n), *prune_args(model, out)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert (out / "budgets.json").exists() == (point == "after_block")
    result = CliRunner().invoke(main, prune_args(model, out))
    assert result.exit_code == 0, result.output
    assert file_hashes(out) == file_hashes(reference)


def test_owl_refusals(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama")
    for extra, message in (
        (["--pattern", "2:4"], "Error: --budgets owl gives each block its own sparsity; an N:M pattern has one (N/M): use --sparsity"),
        (["--owl-lambda", "0.1", "--sparsity", "0.85"], "Error: --owl-lambda 0.1 with --sparsity 0.85 could give a block a sparsity "
                                                        "outside [0, 1) (the budgets lie within sparsity +- 2 lambda); lower --owl-lambda below 0.075"),
    ):
        args = [a for a in prune_args(model, tmp_path / "o") if a not in ("--sparsity", "0.6")] + extra
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and result.stderr.startswith(message), result.stderr
    result = CliRunner().invoke(main, ["prune", str(model), str(tmp_path / "u"), "--owl-m", "3", "--quiet"])
    assert result.exit_code == 1 and "--owl-m does not apply" in result.stderr and "--budgets owl" in result.stderr


@pytest.mark.parametrize("method", [["--method", "magnitude"], ["--method", "sparsegpt"], ["--method", "ria"],
                                    ["--method", "en-original", "--alpha", "0.25", "--reconstruct"]])
def test_owl_with_every_kind_of_method(tiny_checkpoint, tmp_path, method):
    model = tiny_checkpoint("llama", dtype="float64", layers=4)
    args = [a for a in prune_args(model, tmp_path / "out") if a not in ("--method", "wanda")] + method
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "streamprune.json").read_text())
    budgets = manifest["budgets"]["sparsities"]
    assert len(set(budgets)) > 1 and sum(budgets) / 4 == pytest.approx(0.6, abs=1e-12)
    for index, target in enumerate(budgets):  # the post-condition held each block to its own budget
        values = [v for k, v in manifest["sparsity"].items() if k.startswith(f"model.layers.{index}.")]
        assert min(values) >= target - 1 / 32 and max(values) < target + 0.05
