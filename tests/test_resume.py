"""Interrupted runs resume to a bitwise identical checkpoint; half-written outputs never look complete."""

import errno
import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import streamprune.checkpoint
from streamprune.cli import main
from streamprune.data import WIKITEXT_CALIBRATION

KILL_AT = Path(__file__).parent / "kill_at.py"


def prune_args(model, out, *extra):
    return ["prune", str(model), str(out), "--method", "en-original", "--alpha", "0.25", "--sparsity", "0.6",
            "--calib", str(WIKITEXT_CALIBRATION), "--nsamples", "4", "--seqlen", "24", "--batch-size", "3",
            "--quiet", *extra]


def run_cli(args):
    return CliRunner().invoke(main, args)


def file_hashes(directory):
    """Every file of a checkpoint but the manifest (which holds timings), by content."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).iterdir())
        if p.is_file() and p.name != "streamprune.json"
    }


def looks_complete(out):
    manifest = json.loads((out / "streamprune.json").read_text()) if (out / "streamprune.json").exists() else {}
    return (out / "model.safetensors.index.json").exists() or manifest.get("status") == "complete"


@pytest.fixture(scope="module")
def model_and_reference(tiny_checkpoint, tmp_path_factory):
    model = tiny_checkpoint("llama", dtype="float32", layers=4)
    reference = tmp_path_factory.mktemp("reference") / "out"
    result = run_cli(prune_args(model, reference))
    assert result.exit_code == 0, result.output
    return model, file_hashes(reference)


@pytest.mark.parametrize(
    "point, n, overlap",
    [
        ("before_first_block", 1, []),
        ("run_block", 3, []),
        ("write_shard", 2, []),
        ("after_block", 2, []),
        ("before_index", 1, []),
        ("write_shard", 3, ["--overlap"]),  # the background writer dies with the process
        ("run_block", 5, ["--overlap"]),
    ],
)
def test_sigkill_then_the_same_command_gives_a_bitwise_identical_checkpoint(model_and_reference, tmp_path, point, n, overlap):
    model, reference = model_and_reference
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, str(KILL_AT), point, str(n), *prune_args(model, out, *overlap)],
                            capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert not looks_complete(out)
    result = run_cli(prune_args(model, out))
    assert result.exit_code == 0, result.output
    if point != "before_first_block":
        assert "resuming the unfinished run" in result.stderr
    assert file_hashes(out) == reference
    manifest = json.loads((out / "streamprune.json").read_text())
    assert manifest["status"] == "complete" and manifest["resumed"] == 1 and manifest["blocks_done"] == 4
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("block", [1, 4])
def test_ctrl_c_stops_after_the_block_says_how_to_resume_and_resumes(model_and_reference, tmp_path, block, monkeypatch):
    """Also during the last block: the command stops (a sweep must not go on), and the rerun writes the
    rest, without running the calibration text through the embeddings again."""
    model, reference = model_and_reference
    out = tmp_path / "out"
    stopped = subprocess.run([sys.executable, str(KILL_AT), "sigint_after_block", str(block), *prune_args(model, out)],
                             capture_output=True, text=True)
    assert stopped.returncode == 130
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"Error: stopped after block {block} of 4; rerun the same command to resume where it stopped"
    )
    manifest = json.loads((out / "streamprune.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["blocks_done"] == block
    assert not looks_complete(out)
    embedded = []
    real_embed = streamprune.blocks.DecoderStack.embed
    monkeypatch.setattr(streamprune.blocks.DecoderStack, "embed", lambda *a, **k: embedded.append(1) or real_embed(*a, **k))
    resumed = run_cli([arg for arg in prune_args(model, out) if arg != "--quiet"])  # bars on: whole lines here
    assert resumed.exit_code == 0
    assert file_hashes(out) == reference
    assert len(embedded) == (block < 4)
    # the blocks written are replayed under a bar of their own; the pruning bar starts after them
    lines = [line.split(" [")[0] for line in resumed.stderr.splitlines() if line.startswith(("Replaying", "Pruning"))]
    replayed = [f"Replaying written blocks: 0/{block} block", f"Replaying written blocks: {block}/{block} block"] if block < 4 else []
    assert lines == replayed + [f"Pruning blocks: {block}/4 block", "Pruning blocks: 4/4 block"][: 1 if block == 4 else 2]


def test_a_resumed_bar_starts_at_the_blocks_already_written(model_and_reference, tmp_path):
    """Magnitude keeps no hidden states, so nothing is replayed: the bar starts at block 2 of 4, and its
    rate counts only this session's blocks (tqdm's initial; an update(2) at the start showed 2 blocks done
    in no time)."""
    model, _ = model_and_reference
    out = tmp_path / "out"
    args = ["prune", str(model), str(out), "--method", "magnitude", "--sparsity", "0.5"]
    stopped = subprocess.run([sys.executable, str(KILL_AT), "sigint_after_block", "2", *args], capture_output=True, text=True)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    result = run_cli(args)  # stderr is not a terminal here: whole lines
    assert result.exit_code == 0, result.output
    bars = [line for line in result.stderr.splitlines() if line.startswith("Pruning blocks:")]
    assert bars[0].startswith("Pruning blocks: 2/4 block [00:00<?") and bars[-1].startswith("Pruning blocks: 4/4 block")


def test_a_full_disk_is_a_clear_error_and_the_run_resumes_once_space_is_free(model_and_reference, tmp_path, monkeypatch):
    model, reference = model_and_reference
    out = tmp_path / "out"
    real_save = streamprune.checkpoint.save_file
    calls = []

    def disk_fills_up(tensors, path, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, **kwargs)

    monkeypatch.setattr(streamprune.checkpoint, "save_file", disk_fills_up)
    result = run_cli(prune_args(model, out))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: no space left on the device while writing ")
    assert "model-00003-of-00005.safetensors; free some space and rerun the same command" in result.stderr
    assert not list(out.glob(".*.tmp")) and not looks_complete(out)
    monkeypatch.setattr(streamprune.checkpoint, "save_file", real_save)
    assert run_cli(prune_args(model, out)).exit_code == 0
    assert file_hashes(out) == reference


def test_resuming_with_other_options_is_refused_naming_the_option(model_and_reference, tmp_path, tiny_checkpoint):
    model, _ = model_and_reference
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, str(KILL_AT), "after_block", "1", *prune_args(model, out)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    for extra, named in [
        (["--alpha", "0.5"], "--alpha was 0.25 and is now 0.5"),
        (["--seed", "1"], "--seed was 0 and is now 1"),
        (["--sparsity", "0.5"], "--sparsity was 0.6 and is now 0.5"),
        (["--method", "en-modified"], "--method was 'en-original' and is now 'en-modified'"),
    ]:
        args = prune_args(model, out)
        args = args[: args.index("--quiet")] + extra + ["--quiet"]
        result = run_cli(args)
        assert result.exit_code == 1 and named in result.stderr and "--overwrite" in result.stderr, result.stderr
    other_model = tiny_checkpoint("llama", dtype="float32", layers=4, hidden=32, intermediate=64)
    result = run_cli(prune_args(other_model, out))
    assert result.exit_code == 1 and "the model differs" in result.stderr
    result = run_cli(prune_args(model, out, "--no-resume"))
    assert result.exit_code == 0 and "resuming" not in result.stderr
    assert json.loads((out / "streamprune.json").read_text())["resumed"] == 0


def test_inspect_reports_sparsity_progress_and_damage(model_and_reference, tmp_path):
    model, _ = model_and_reference
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, str(KILL_AT), "after_block", "2", *prune_args(model, out)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    result = run_cli(["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert "streamprune run running (en-original (alpha 0.25), 60%); 2 of 4 blocks present" in result.stdout
    assert "not finished (no index yet)" in result.stdout
    assert run_cli(prune_args(model, out)).exit_code == 0
    report_file = tmp_path / "report.json"
    result = run_cli(["inspect", str(out), "--json", str(report_file)])
    assert result.exit_code == 0 and "OK: every tensor is present" in result.stdout
    report = json.loads(report_file.read_text())
    assert report["blocks_done"] == 4 and report["complete"]
    assert set(report["sparsity"].values()) == {int(0.6 * 64) / 64, int(0.6 * 160) / 160}
    next(out.glob("model-00002-of-*.safetensors")).unlink()
    result = run_cli(["inspect", str(out)])
    assert result.exit_code == 1 and "problem: shard model-00002-of-00005.safetensors" in result.stdout
    result = run_cli(["inspect", str(model)])  # any checkpoint: the dense input is whole, and not sparse
    assert result.exit_code == 0 and "overall: 0.00%" in result.stdout
    assert_no_traceback = run_cli(["inspect", str(tmp_path / "nothing")])
    assert assert_no_traceback.exit_code == 1 and assert_no_traceback.stderr.startswith("Error: ")


def sparsegpt_args(model, out):
    return ["prune", str(model), str(out), "--method", "sparsegpt", "--blocksize", "48", "--sparsity", "0.6",
            "--calib", str(WIKITEXT_CALIBRATION), "--nsamples", "4", "--seqlen", "24", "--batch-size", "3", "--quiet"]


@pytest.mark.parametrize("point, n", [("run_block", 3), ("after_block", 2)])
def test_sparsegpt_resumes_to_a_bitwise_identical_checkpoint(model_and_reference, tmp_path, point, n):
    model, _ = model_and_reference
    assert run_cli(sparsegpt_args(model, tmp_path / "reference")).exit_code == 0
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, str(KILL_AT), point, str(n), *sparsegpt_args(model, out)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    result = run_cli(sparsegpt_args(model, out))
    assert result.exit_code == 0 and "resuming the unfinished run" in result.stderr, result.output
    assert file_hashes(out) == file_hashes(tmp_path / "reference")
