"""EN-auto: the per-block choice on hand-made blocks, the engine's plumbing, resume, and refusals."""

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from streamprune.cli import main
from streamprune.config import PruneConfig
from streamprune.data import WIKITEXT_CALIBRATION
from streamprune.methods import BlockView
from streamprune.methods.en_auto import choices_summary, pick
from streamprune.stats import input_statistics, linear_layers

KILL_AT = Path(__file__).parent / "kill_at.py"


class HandMadeBlock(nn.Module):
    """y = act(x w^T) with w = [1, -1]."""

    def __init__(self, act):
        super().__init__()
        self.proj = nn.Linear(2, 1, bias=False, dtype=torch.float64)
        self.act = act
        with torch.no_grad():
            self.proj.weight.copy_(torch.tensor([[1.0, -1.0]]))

    def forward(self, x):
        return self.act(self.proj(x))


def choose_on(block, alphas):
    # feature 1 is 1 on all 100 tokens (L1 mean 1, L2 1); feature 2 is 20 on token 0 only (L1 mean 0.2, L2 2):
    # alpha 0 (Wanda's L2) prunes feature 1, alpha 1 (L1) prunes feature 2
    x = torch.zeros(1, 100, 2, dtype=torch.float64)
    x[0, :, 0], x[0, 0, 1] = 1.0, 20.0
    with input_statistics(block, frozenset({"norms"})) as statistics:
        block(x)
    view = BlockView(0, linear_layers(block), lambda rows: block(x[:rows]).float())
    configs = [PruneConfig.of(method="en-modified", alpha=a, sparsity=0.5) for a in alphas]
    return pick(view, statistics, configs, 1)


def test_en_auto_picks_the_clearly_better_alpha_on_hand_made_blocks():
    relu = HandMadeBlock(torch.relu)
    # after the ReLU: without feature 2 the output is 1 where the dense one is 0 (token 0 only, error 1);
    # without feature 1 it is 0 where the dense one is 1 (99 tokens): mean squared errors 0.01 and 0.99
    best, errors = choose_on(relu, [0.0, 1.0])
    assert best == 1 and errors == pytest.approx([0.99, 0.01])
    assert torch.equal(relu.proj.weight, torch.tensor([[1.0, -1.0]], dtype=torch.float64))  # restored
    # a linear block: dropping feature 2 costs 20^2 on one token, dropping feature 1 costs 1 on 100
    best, errors = choose_on(HandMadeBlock(lambda y: y), [1.0, 0.0])
    assert best == 1 and errors == pytest.approx([4.0, 1.0])


def prune_args(model, out, *extra):
    return ["prune", str(model), str(out), "--calib", str(WIKITEXT_CALIBRATION), "--nsamples", "6", "--seqlen", "24",
            "--batch-size", "4", "--quiet", *extra]


def file_hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())
            if p.is_file() and p.name != "streamprune.json"}


def test_en_auto_with_one_candidate_prunes_as_the_fixed_method(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama", dtype="float64", layers=3)
    fixed, auto = tmp_path / "fixed", tmp_path / "auto"
    assert CliRunner().invoke(main, prune_args(model, fixed, "--method", "en-original", "--alpha", "0.25")).exit_code == 0
    result = CliRunner().invoke(main, prune_args(model, auto, "--method", "en-auto", "--alphas", "0.25", "--geometry", "original"))
    assert result.exit_code == 0, result.output
    assert file_hashes(auto) == file_hashes(fixed)
    assert "blocks 0-2: original a=0.25" in result.output


@pytest.fixture(scope="module")
def auto_run(tiny_checkpoint, tmp_path_factory):
    model = tiny_checkpoint("llama", dtype="float64", layers=4)
    out = tmp_path_factory.mktemp("auto") / "out"
    result = CliRunner().invoke(main, prune_args(model, out, "--method", "en-auto", "--geometry", "both", "--auto-windows", "3"))
    assert result.exit_code == 0, result.output
    return model, out, result.output


def test_en_auto_records_every_candidate_and_keeps_the_best(auto_run):
    model, out, output = auto_run
    manifest = json.loads((out / "streamprune.json").read_text())
    choices = manifest["block_choices"]
    assert sorted(choices, key=int) == ["0", "1", "2", "3"]
    for choice in choices.values():
        # 5 alphas x 2 geometries, EN-Original at 1 being EN-Modified at 1
        assert len(choice["mse"]) == 9 and "original a=1" not in choice["mse"]
        best = min(choice["mse"], key=choice["mse"].get)
        assert best == f"{choice['method'].removeprefix('en-')} a={choice['alpha']:g}"
    assert len({json.dumps(c["mse"]) for c in choices.values()}) == 4
    assert choices_summary(choices) in output
    report = CliRunner().invoke(main, ["inspect", str(out)])
    assert "EN-auto choice" in report.output


def test_a_killed_en_auto_run_resumes_bitwise(auto_run, tmp_path):
    model, reference, _ = auto_run
    out = tmp_path / "out"
    args = prune_args(model, out, "--method", "en-auto", "--geometry", "both", "--auto-windows", "3")
    killed = subprocess.run([sys.executable, str(KILL_AT), "after_block", "2", *args], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert file_hashes(out) == file_hashes(reference)
    resumed = json.loads((out / "streamprune.json").read_text())["block_choices"]
    assert resumed == json.loads((reference / "streamprune.json").read_text())["block_choices"]


def test_en_auto_composes_with_n_m_and_reconstruct_and_refuses_owl(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama", dtype="float64", layers=2)
    result = CliRunner().invoke(main, prune_args(model, tmp_path / "nm", "--method", "en-auto", "--pattern", "2:4", "--reconstruct"))
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "nm" / "streamprune.json").read_text())
    assert manifest["status"] == "complete" and set(manifest["sparsity"].values()) == {0.5}
    for extra, message in ((["--budgets", "owl"], "--budgets owl counts outliers of the method's score, and en-auto has no single score"),
                           (["--alphas", "0,2"], "--alphas must be in [0, 1], got 2")):
        result = CliRunner().invoke(main, prune_args(model, tmp_path / "x", "--method", "en-auto", *extra))
        assert result.exit_code == 1 and result.stderr.startswith(f"Error: {message}"), result.stderr
