"""Nothing non-finite and no unmet promise reaches an output marked complete; errors and warnings are lines."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import streamprune
import streamprune.sweep
from streamprune import checks, masking
from streamprune.cli import main
from streamprune.data import WIKITEXT_CALIBRATION, WIKITEXT_HELD_OUT
from streamprune.errors import NumericalError, StreamPruneError
from streamprune.masking import verify_sparsity
from streamprune.methods import Groups
from streamprune.methods.scaled import keep_mask

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
WIKI = str(WIKITEXT_CALIBRATION)
Q0 = "model.layers.0.self_attn.q_proj.weight"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def edited_copy(source: Path, dest: Path, edits: dict) -> Path:
    """A copy of a checkpoint with some tensors replaced by edit(tensor); the source is left alone."""
    shutil.copytree(source, dest)
    index = json.loads((dest / "model.safetensors.index.json").read_text())["weight_map"]
    for filename in sorted({index[name] for name in edits}):
        tensors = load_file(dest / filename)
        for name, edit in edits.items():
            if index[name] == filename:
                tensors[name] = edit(tensors[name].clone()).contiguous()
        save_file(tensors, dest / filename, metadata={"format": "pt"})
    return dest


def set_entry(value, row=0, column=0):
    def edit(tensor):
        tensor[row, column] = value
        return tensor

    return edit


def tree_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def only_line(stderr: str, prefix: str) -> str:
    """The one stderr line starting with `prefix`; it must start its line (no residue before it)."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if prefix in line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(prefix), repr(stderr)
    return lines[0]


def manifest(out: Path) -> dict:
    return json.loads((out / "streamprune.json").read_text())


def prune_args(model, out, *extra):
    return ["prune", model, out, "--method", "wanda", "--calib", WIKI, "--nsamples", "4", "--seqlen", "16", "--quiet", *extra]


@pytest.fixture(scope="module")
def overflowing(tiny_checkpoint, tmp_path_factory):
    """float16 weights whose MLP activations overflow float16 in block 0 (but not float32): the
    post-attention norm weight set to 3000 and the MLP weights multiplied by 100."""
    p = "model.layers.0."
    edits = {p + "post_attention_layernorm.weight": lambda t: torch.full_like(t, 3000)}
    edits.update({p + f"mlp.{name}.weight": (lambda t: t * 100) for name in ("gate_proj", "up_proj", "down_proj")})
    return edited_copy(tiny_checkpoint("llama", dtype="float16", layers=2), tmp_path_factory.mktemp("f16") / "model", edits)


# -- non-finite weights in the input ------------------------------------------------------------------


def test_a_nan_weight_is_refused_naming_the_tensor_and_nothing_is_complete(tiny_checkpoint, tmp_path):
    model = edited_copy(tiny_checkpoint("llama", dtype="float32", layers=2), tmp_path / "nan", {Q0: set_entry(float("nan"))})
    before = tree_hash(model)
    out = tmp_path / "out"
    result = invoke(*prune_args(model, out))
    assert result.exit_code == 1
    line = only_line(result.stderr, "Error:")
    assert line.startswith(f"Error: {Q0} has 1 non-finite value (NaN) (in {model}/model-000")
    assert line.endswith("streamprune will not prune or evaluate a damaged checkpoint")
    assert "Traceback" not in result.output
    assert manifest(out)["status"] == "failed" and manifest(out)["error"] in line
    assert not (out / "model.safetensors.index.json").exists()
    assert tree_hash(model) == before  # the input is never modified
    result = invoke("eval", model, "--ppl", WIKITEXT_HELD_OUT, "--seqlen", "32", "--max-windows", "2", "--quiet")
    assert result.exit_code == 1 and only_line(result.stderr, "Error:").startswith(f"Error: {Q0} has 1 non-finite value")


def test_a_damaged_later_block_fails_there_and_the_run_stays_resumable(tiny_checkpoint, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    two_columns = {name: lambda t: t.index_fill_(1, torch.tensor([2, 5]), float("-inf"))}  # 2 x 64 rows
    model = edited_copy(tiny_checkpoint("llama", dtype="float32", layers=2), tmp_path / "inf", two_columns)
    out = tmp_path / "out"
    result = invoke(*prune_args(model, out))
    line = only_line(result.stderr, "Error:")
    assert line.startswith(f"Error: {name} has 128 non-finite values (-inf)"), line
    assert manifest(out)["status"] == "failed" and manifest(out)["blocks_done"] == 1
    result = invoke(*prune_args(model, out))  # the same command resumes after block 0, and stops again
    assert f"Warning: resuming the unfinished run in {out}: 1 of its 2 blocks are done" in result.stderr
    assert only_line(result.stderr, "Error:").startswith(f"Error: {name} has 128 non-finite values")


def test_a_nan_lm_head_is_refused_before_the_output_is_made(tiny_checkpoint, tmp_path):
    model = edited_copy(tiny_checkpoint("llama", dtype="float32", layers=2), tmp_path / "head", {"lm_head.weight": set_entry(float("nan"), 5, 1)})
    out = tmp_path / "out"
    result = invoke(*prune_args(model, out, "--method", "magnitude"))
    assert only_line(result.stderr, "Error:").startswith("Error: lm_head.weight has 1 non-finite value (NaN)")
    assert not out.exists()


def test_a_weight_beyond_float16_is_refused_when_computed_in_float16(tiny_checkpoint, tmp_path):
    model = edited_copy(tiny_checkpoint("llama", dtype="float32", layers=2), tmp_path / "big", {Q0: set_entry(1e5, 1, 2)})
    result = invoke(*prune_args(model, tmp_path / "out", "--dtype", "float16"))
    line = only_line(result.stderr, "Error:")
    assert "holds values up to 1e+05, beyond the range of the compute dtype float16" in line
    assert line.endswith("compute in --dtype bfloat16 or --dtype float32 instead (into an output that holds this run, also pass --overwrite)")
    result = invoke(*prune_args(model, tmp_path / "out", "--dtype", "float32", "--overwrite"))
    assert result.exit_code == 0, result.output


def test_what_fits_float16_is_decided_as_the_conversion_rounds():
    checks.check_fits("w", 65519.0, torch.float16)  # rounds down to 65504
    with pytest.raises(StreamPruneError, match="w holds values up to 6.552e"):
        checks.check_fits("w", 65520.0, torch.float16)  # rounds up to inf
    checks.check_fits("w", 3.3e38, torch.bfloat16)
    checks.check_fits("w", 1e300, torch.float64)
    checks.check_fits("w", None, torch.float16)  # integer tensors, or the checks off


# -- activations that overflow the compute dtype ------------------------------------------------------


def test_float16_overflow_stops_at_the_block_and_linear_and_float32_prunes_it(overflowing, tmp_path):
    out = tmp_path / "f16"
    result = invoke(*prune_args(overflowing, out, "--dtype", "float16"))
    assert result.exit_code == 1
    assert only_line(result.stderr, "Error:") == (
        "Error: the activations overflowed float16 in block 0 (mlp.down_proj input); "
        "rerun with --dtype bfloat16 or --dtype float32 and --overwrite"
    )
    assert manifest(out)["status"] == "failed" and manifest(out)["blocks_done"] == 0
    result = invoke(*prune_args(overflowing, out, "--dtype", "float32", "--overwrite"))
    assert result.exit_code == 0, result.output
    down = load_file(next(out.glob("model-00001-*.safetensors")))["model.layers.0.mlp.down_proj.weight"]
    assert torch.all((down == 0).sum(dim=1) == down.shape[1] // 2)


def test_overflow_in_a_block_output_is_blamed_on_that_output(tiny_checkpoint, tmp_path):
    # block 0's MLP inputs stay finite, but its down_proj output (weights 60000) does not
    model = edited_copy(
        tiny_checkpoint("llama", dtype="float16", layers=2), tmp_path / "residual",
        {"model.layers.0.post_attention_layernorm.weight": lambda t: torch.full_like(t, 100.0),
         "model.layers.0.mlp.down_proj.weight": lambda t: torch.full_like(t, 60000.0)},
    )
    result = invoke(*prune_args(model, tmp_path / "out", "--dtype", "float16"))
    assert only_line(result.stderr, "Error:").startswith(
        "Error: the hidden states entering block 1 (the output of block 0) overflowed float16;"
    )


def test_eval_names_the_first_window_or_answer_whose_log_likelihood_is_not_finite(overflowing):
    result = invoke("eval", overflowing, "--ppl", WIKITEXT_HELD_OUT, "--seqlen", "32", "--max-windows", "3",
                    "--dtype", "float16", "--quiet")
    assert result.exit_code == 1 and "nan" not in result.stdout
    line = only_line(result.stderr, "Error:")
    assert line.startswith(f"Error: the log-likelihood of perplexity window 0 of {WIKITEXT_HELD_OUT} (tokens 0 to 31) is nan")
    assert line.endswith("evaluate with --dtype bfloat16 or --dtype float32")
    result = invoke("eval", overflowing, "--tasks", "boolq", "--limit", "3", "--data-dir", DATA, "--dtype", "float16", "--quiet")
    assert only_line(result.stderr, "Error:").startswith(
        "Error: the log-likelihood of boolq example 0 of the 3 evaluated, answer 'no' is nan"
    )
    result = invoke("eval", overflowing, "--tasks", "boolq", "--limit", "3", "--data-dir", DATA, "--quiet")
    assert result.exit_code == 0, result.output  # float32 (auto on a CPU) holds these activations


# -- scores and the post-condition -------------------------------------------------------------------


def test_scores_beyond_float32_are_ranked_in_float64_never_as_infinities(monkeypatch):
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    l2sq = torch.tensor([1e80, 4e80, 1e78, 1e79], dtype=torch.float64)  # wanda scale 1e40, 2e40, 1e39, 3.2e39
    handed = []
    real = masking.row_mask
    monkeypatch.setattr("streamprune.methods.scaled.row_mask", lambda s, sp: handed.append(s) or real(s, sp))
    keep = keep_mask(weight, l2sq.sqrt(), 0.5, None)
    assert all(torch.isfinite(s).all() for s in handed)
    # scores: row 0 = 1e40, 4e40, 3e39, 1.26e40; row 1 = 4e40, 6e40, 2e39, 3.2e39
    assert keep.tolist() == [[False, True, False, True], [True, True, False, False]]


def test_sparsity_post_condition_on_hand_made_weights():
    w = torch.tensor([[0.0, -0.0, 3.0, 4.0, 0.0, 6.0, 7.0, 8.0],
                      [1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 7.0, 8.0]], dtype=torch.float16)
    rows = Groups(columns=8)
    assert verify_sparsity(w, 0.375, rows) == (7 / 16, None)  # 3 and 4 zeros per row, 3 asked
    assert verify_sparsity(w, 0.5, rows) == (7 / 16, "row 0 has 3 zeros, fewer than the 4 asked")
    # 2:4: row 0 groups hold 2 and 1 zeros; the second group of row 0 is short
    assert verify_sparsity(w, 0.5, Groups(columns=4, n=2)) == (7 / 16, "row 0, inputs 4 to 7, has 1 zeros, fewer than the 2 asked")
    assert verify_sparsity(w, 0.25, Groups(columns=4, n=1)) == (7 / 16, None)
    # SparseGPT's column blocks: all rows at once; inputs 0-2 hold 3 zeros of 6 entries, 3-5 hold 3, 6-7 none
    blocks = Groups(columns=3, all_rows=True)
    assert verify_sparsity(w, 0.5, blocks) == (7 / 16, "inputs 6 to 7 (all rows) hold 0 zeros, fewer than the 2 asked")
    assert verify_sparsity(w[:, :6], 0.5, blocks) == (7 / 12, None)  # per row, row 0 would have only 2 of 3
    nan = torch.tensor([[float("nan"), 0.0]])
    assert verify_sparsity(nan, 0.5, Groups(columns=2)) == (0.5, None)  # NaN is not a zero; one zero of the one asked


def test_a_tensor_left_unpruned_fails_the_run_with_its_name(tiny_checkpoint, tmp_path, monkeypatch):
    real = masking.row_mask

    def forgets_a_row(scores, sparsity):
        keep = real(scores, sparsity)
        if scores.shape[1] == 160:  # down_proj: one row kept whole
            keep[0] = True
        return keep

    monkeypatch.setattr("streamprune.methods.scaled.row_mask", forgets_a_row)
    out = tmp_path / "out"
    with pytest.raises(NumericalError, match=r"model.layers.0.mlp.down_proj.weight is not pruned as asked: row 0 has 0 zeros, fewer than the 80 asked"):
        streamprune.prune(tiny_checkpoint("llama", dtype="float32", layers=2), out, calib=WIKI, nsamples=2, seqlen=16, progress=False)
    assert manifest(out)["status"] == "failed" and manifest(out)["blocks_done"] == 0
    assert not list(out.glob("model-*.safetensors"))


def test_row_chunk_boundaries_do_not_change_masks_or_checks(tiny_checkpoint, tmp_path, monkeypatch):
    model = tiny_checkpoint("llama", dtype="float64", layers=2)
    options = dict(calib=WIKI, nsamples=3, seqlen=16, method="en-original", alpha=0.3, progress=False)
    streamprune.prune(model, tmp_path / "whole", **options)
    streamprune.prune(model, tmp_path / "whole-24", pattern="2:4", **{**options, "sparsity": 0.5})
    monkeypatch.setattr(masking, "ROW_CHUNK", 7)  # 64 rows: chunks end mid-tensor
    rows_seen = []
    for name in ("row_mask", "n_m_mask"):
        real = getattr(masking, name)
        monkeypatch.setattr(f"streamprune.methods.scaled.{name}", lambda s, *a, real=real: rows_seen.append(s.shape[0]) or real(s, *a))
    streamprune.prune(model, tmp_path / "chunked", **options)
    streamprune.prune(model, tmp_path / "chunked-24", pattern="2:4", **{**options, "sparsity": 0.5})
    assert max(rows_seen) == 7 and 64 % 7 in rows_seen
    for a, b in (("whole", "chunked"), ("whole-24", "chunked-24")):
        for shard in sorted((tmp_path / a).glob("model-*.safetensors")):
            x, y = load_file(shard), load_file(tmp_path / b / shard.name)
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), shard.name
        assert manifest(tmp_path / a)["sparsity"] == manifest(tmp_path / b)["sparsity"]


def test_switching_the_checks_off_changes_no_byte_and_is_recorded(tiny_checkpoint, tmp_path, monkeypatch):
    model = tiny_checkpoint("llama", dtype="float32", layers=2)
    options = dict(calib=WIKI, nsamples=2, seqlen=16, progress=False)
    checked = streamprune.prune(model, tmp_path / "checked", **options)
    monkeypatch.setattr(checks, "ENABLED", False)
    unchecked = streamprune.prune(model, tmp_path / "unchecked", **options)
    assert checked.sparsity == unchecked.sparsity  # the post-condition's count is the manifest's count
    for shard in sorted((tmp_path / "checked").glob("model-*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "unchecked" / shard.name).read_bytes()
    assert checked.checked and not unchecked.checked
    assert "made with its checks off" in invoke("inspect", tmp_path / "unchecked").stdout


def test_inspect_reports_non_finite_tensors_and_why_a_run_failed(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama", dtype="float32", layers=2)
    damaged = edited_copy(source, tmp_path / "damaged", {"model.layers.1.mlp.up_proj.weight": set_entry(float("inf"), 2, 3)})
    result = invoke("inspect", damaged)
    assert result.exit_code == 1
    assert "problem: tensor model.layers.1.mlp.up_proj.weight has 1 non-finite value (+inf)" in result.stdout
    out = tmp_path / "out"
    invoke(*prune_args(damaged, out))
    result = invoke("inspect", out)
    assert result.exit_code == 1 and "streamprune run failed (wanda, 50%); 1 of 2 blocks present" in result.stdout
    assert "problem: the streamprune run failed: model.layers.1.mlp.up_proj.weight has 1 non-finite value (+inf)" in result.stdout
    result = invoke("eval", out, "--ppl", WIKITEXT_HELD_OUT, "--seqlen", "32", "--quiet")
    assert only_line(result.stderr, "Error:") == (
        f"Error: {out} holds an unfinished streamprune run (failed, 1 of 2 blocks done: model.layers.1.mlp.up_proj.weight "
        f"has 1 non-finite value (+inf) (in {damaged}/model-00006-of-00007.safetensors); streamprune will not prune or "
        "evaluate a damaged checkpoint); rerun its prune command to finish it"
    )


def test_another_model_of_the_same_shape_does_not_resume_a_run(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama", dtype="float32", layers=2)
    first = edited_copy(source, tmp_path / "first", {"model.layers.1.mlp.up_proj.weight": set_entry(float("nan"))})
    second = edited_copy(source, tmp_path / "second", {"model.layers.0.mlp.up_proj.weight": lambda t: t * 1.01})
    out = tmp_path / "out"
    invoke(*prune_args(first, out))
    assert manifest(out)["blocks_done"] == 1
    result = invoke(*prune_args(second, out))  # same config, index and file sizes; other weights
    assert only_line(result.stderr, "Error:").startswith(
        f"Error: output directory {out} holds an unfinished run with other options: the model differs"
    )


def test_a_pattern_and_another_sparsity_are_refused(tiny_checkpoint, tmp_path):
    result = invoke(*prune_args(tiny_checkpoint("llama", dtype="float32", layers=2), tmp_path / "o", "--pattern", "2:4", "--sparsity", "0.3"))
    assert only_line(result.stderr, "Error:") == "Error: --pattern 2:4 prunes 50% by itself; give --sparsity or --pattern, not both"


# -- calibration overlap, versions, sweeps ----------------------------------------------------------


def test_a_short_calibration_text_warns_on_its_own_line_and_the_manifest_counts_distinct_tokens(tiny_checkpoint, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 300)
    out = tmp_path / "out"
    result = invoke("prune", tiny_checkpoint("llama", dtype="float32", layers=2), out, "--calib", short,
                    "--nsamples", "16", "--seqlen", "512")
    assert result.exit_code == 0, result.output
    line = only_line(result.stderr, "Warning: the calibration text")
    assert line.startswith("Warning: the calibration text has only 3,000 tokens: the 16 windows of 512 tokens (8,192 tokens) cover")
    calibration = manifest(out)["calibration"]
    assert calibration["tokens"] == 8192 and calibration["text_tokens"] == 3000
    assert f"cover {calibration['distinct_tokens']:,} distinct tokens" in line and calibration["distinct_tokens"] <= 3000


def test_resume_refuses_other_library_versions(tiny_checkpoint, tmp_path):
    model = edited_copy(tiny_checkpoint("llama", dtype="float32", layers=2), tmp_path / "m",
                        {"model.layers.1.self_attn.o_proj.weight": set_entry(float("nan"))})
    out = tmp_path / "out"
    invoke(*prune_args(model, out))
    recorded = manifest(out)
    assert recorded["status"] == "failed"
    recorded["versions"]["transformers"] = "4.0.0"
    (out / "streamprune.json").write_text(json.dumps(recorded))
    result = invoke(*prune_args(model, out))
    import transformers

    assert only_line(result.stderr, "Error:").startswith(
        f"Error: output directory {out} holds an unfinished run, but transformers was 4.0.0 when it started and is "
        f"now {transformers.__version__}: resumed, it would not be bitwise identical"
    )
    assert "--no-resume or --overwrite" in result.stderr
    result = invoke(*prune_args(model, out, "--no-resume"))
    assert only_line(result.stderr, "Error:").startswith("Error: model.layers.1.self_attn.o_proj.weight has 1 non-finite")


def test_a_sweep_records_a_failed_configuration_and_goes_on(tiny_checkpoint, tmp_path, monkeypatch):
    import streamprune.engine

    real = streamprune.engine.prune_block

    def overflows_in_block_one_at_alpha_one(stack, index, block, acts, config):
        if config.option_values["alpha"] == 1.0 and index == 1:  # inside the real pruning run, after block 0 is written
            raise NumericalError("the activations overflowed float16 in block 1 (mlp.down_proj input)")
        return real(stack, index, block, acts, config)

    monkeypatch.setattr(streamprune.engine, "prune_block", overflows_in_block_one_at_alpha_one)
    args = ["sweep", tiny_checkpoint("llama", dtype="float32", layers=2), tmp_path / "sweep", "--alphas", "0,1",
            "--geometries", "modified", "--calib", WIKI, "--nsamples", "2", "--calib-seqlen", "16",
            "--ppl", WIKITEXT_HELD_OUT, "--seqlen", "32", "--max-windows", "2", "--quiet"]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert only_line(result.stderr, "Warning:") == (
        "Warning: EN-Modified a=1 50% failed: the activations overflowed float16 in block 1 (mlp.down_proj input)"
    )
    assert only_line(result.stderr, "Error:") == (
        "Error: 1 of 2 configurations failed (EN-Modified a=1 50%: the activations overflowed float16 in block 1 "
        f"(mlp.down_proj input)); the reasons are listed in {tmp_path / 'sweep' / 'results.md'}"
    )
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    assert [("failed" in r, r.get("ppl") is not None) for r in rows] == [(False, True), (False, True), (True, False)]
    assert rows[2]["failed"] == "the activations overflowed float16 in block 1 (mlp.down_proj input)"
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert "| 1 | failed |" in table and "- EN-Modified a=1 50%: the activations overflowed" in table
    assert not (tmp_path / "sweep" / "checkpoints").exists()  # the failed pruning's output is removed too
    monkeypatch.setattr(streamprune.sweep, "prune", lambda *a, **k: pytest.fail("a recorded configuration was redone"))
    assert invoke(*args).exit_code == 1


# -- progress and message lines ----------------------------------------------------------------------


def test_a_log_gets_whole_lines_and_errors_start_their_own_line(tiny_checkpoint, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 300)
    log = tmp_path / "log.txt"
    model = tiny_checkpoint("llama", dtype="float32", layers=2)
    with log.open("w") as stderr:  # a file: not a terminal
        done = subprocess.run(
            [sys.executable, "-m", "streamprune.cli", "prune", str(model), str(tmp_path / "out"), "--calib", str(short),
             "--nsamples", "16", "--seqlen", "512", "--sparsity", "1.5"], stderr=stderr, stdout=subprocess.PIPE,
        )
        assert done.returncode == 1
        done = subprocess.run(
            [sys.executable, "-m", "streamprune.cli", "prune", str(model), str(tmp_path / "out"), "--calib", str(short),
             "--nsamples", "16", "--seqlen", "4000"], stderr=stderr, stdout=subprocess.PIPE,
        )
        assert done.returncode == 1
    text = log.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "Error: sparsity must be in [0, 1), got 1.5"
    assert lines[1].startswith("Tokenizing calibration text: 0/")
    assert lines[2].startswith("Tokenizing calibration text: 3000/")  # its end: the text ran out
    assert lines[3].startswith("Error: the calibration text has 3000 tokens, fewer than one window of seqlen 4000")
    assert len(lines) == 4


def test_a_terminal_bar_is_cleared_before_a_warning(monkeypatch, capsys):
    from streamprune import progress

    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    with progress.bar(total=3, desc="Pruning blocks", unit="block") as bar:
        bar.update()
        progress.message("Warning: something")
        bar.update()
    err = capsys.readouterr().err
    # as a terminal shows it: every carriage return or newline starts the line afresh
    assert any(segment == "Warning: something" for segment in err.replace("\r", "\n").split("\n"))
    assert "\rWarning: something\n" in err


def test_a_sweep_starts_a_configuration_over_after_a_library_upgrade(tiny_checkpoint, tmp_path, monkeypatch):
    import streamprune.engine

    real = streamprune.engine.prune_block

    def disk_trouble_in_block_one(stack, index, block, acts, config):
        if index == 1:
            raise streamprune.StreamPruneError("no space left on the device")  # stops the sweep, resumable
        return real(stack, index, block, acts, config)

    monkeypatch.setattr(streamprune.engine, "prune_block", disk_trouble_in_block_one)
    args = ["sweep", tiny_checkpoint("llama", dtype="float32", layers=2), tmp_path / "sweep", "--alphas", "0",
            "--geometries", "modified", "--calib", WIKI, "--nsamples", "2", "--calib-seqlen", "16",
            "--ppl", WIKITEXT_HELD_OUT, "--seqlen", "32", "--max-windows", "2", "--quiet"]
    assert only_line(invoke(*args).stderr, "Error:") == "Error: no space left on the device"
    checkpoint = tmp_path / "sweep" / "checkpoints" / "modified-a0-s0.5"
    recorded = manifest(checkpoint)
    assert recorded["blocks_done"] == 1
    recorded["versions"]["torch"] = "1.0.0"
    (checkpoint / "streamprune.json").write_text(json.dumps(recorded))
    monkeypatch.setattr(streamprune.engine, "prune_block", real)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "resuming" not in result.stderr  # started over, not resumed across the upgrade


def test_magnitude_pruning_reads_no_calibration_corpus(tiny_checkpoint, tmp_path):
    """Magnitude runs no block forward: a corpus that cannot be loaded (offline, the default hub corpus)
    does not stop it, and the weights come out as with a corpus that loads."""
    model = tiny_checkpoint("llama", dtype="float32", layers=2)
    args = ["prune", model, None, "--method", "magnitude", "--nsamples", "4", "--seqlen", "16", "--quiet"]
    with_corpus = invoke(*[tmp_path / "a" if a is None else a for a in args], "--calib", WIKI)
    without = invoke(*[tmp_path / "b" if a is None else a for a in args], "--calib", tmp_path / "missing.txt")
    assert with_corpus.exit_code == 0 and without.exit_code == 0, without.output
    for shard in sorted((tmp_path / "a").glob("*.safetensors")):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()
    assert manifest(tmp_path / "b")["status"] == "complete" and manifest(tmp_path / "b")["calibration"]["windows"] == 0
    owl = invoke(*[tmp_path / "d" if a is None else a for a in args], "--budgets", "owl", "--calib", tmp_path / "missing.txt")
    assert owl.exit_code == 0, owl.output  # OWL's outlier ratios of magnitude scores come from the weights too
    wanda = invoke(*prune_args(model, tmp_path / "c", "--calib", tmp_path / "missing.txt"))
    assert "Error: " in wanda.stderr and "missing.txt" in wanda.stderr  # a method that needs it still says so


def test_a_bar_in_a_log_ends_with_its_final_line_unless_an_error_stopped_it(monkeypatch, capsys):
    """In a log, a bar a terminal would clear (leave=False) still says where it ended; one that an error
    stopped, or that close_all closed before an error line, does not."""
    from streamprune import progress

    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: False)
    with progress.bar(total=3, desc="Scoring", unit="block", leave=False) as bar:
        bar.update(3)
    with pytest.raises(ValueError), progress.bar(total=3, desc="Stopped", unit="block", leave=False) as bar:
        bar.update(1)
        raise ValueError
    left_open = progress.bar(total=3, desc="Open", unit="block")
    left_open.update(2)
    progress.close_all()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" [")[0] for line in lines] == ["Scoring: 0/3 block", "Scoring: 3/3 block", "Stopped: 0/3 block", "Open: 0/3 block"]


def test_transformers_gguf_conversion_bar_is_streamprunes_while_the_demo_model_is_built(capsys):
    """transformers draws its GGUF conversion bar with tqdm itself, past its own switch: while the demo
    model is built it is streamprune's, whole lines in a log (stderr here is no terminal), none with
    progress off, and transformers' own tqdm again afterwards."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from streamprune.demo import _conversion_bar

    original = gguf_utils.tqdm
    for enabled in (True, False):
        with _conversion_bar(enabled):
            assert list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")) == [0, 1, 2]
        assert gguf_utils.tqdm is original
        err = capsys.readouterr().err
        if enabled:
            assert "\r" not in err and err.splitlines()[-1].startswith("Converting and de-quantizing GGUF tensors...: 3/3 tensor")
        else:
            assert err == ""


# -- runs sharing an output, foreign calibration ids, a second Ctrl-C ------------------------------------


def test_a_second_run_into_an_output_being_written_is_refused(tiny_checkpoint, tmp_path):
    """While a run holds its output directory (the same command started twice), another is refused with
    one line and writes nothing; once it ends, the same command runs.  A run that fails before writing
    leaves no directory it made."""
    from streamprune.state import OutputLock

    model, out = tiny_checkpoint("llama", dtype="float32", layers=2), tmp_path / "out"
    held = OutputLock(out, model)  # what the first run holds while it prunes
    second = invoke(*prune_args(model, out))
    assert second.exit_code == 1 and only_line(second.stderr, "Error: ") == (
        f"Error: another streamprune run is writing to {out} now; wait for it to end (a rerun then resumes or reports "
        "it), or choose another output directory")
    assert list(out.iterdir()) == []
    held.release()
    assert not out.exists()  # made by the lock, left empty: removed
    nested = tmp_path / "a" / "b" / "c"  # with its parents, all removed again; what was there stays
    (tmp_path / "a").mkdir()
    OutputLock(nested, model).release()
    assert (tmp_path / "a").is_dir() and not (tmp_path / "a" / "b").exists()
    assert invoke(*prune_args(model, out)).exit_code == 0 and manifest(out)["status"] == "complete"
    inside = invoke(*prune_args(model, Path(model) / "pruned"))
    assert inside.exit_code == 1 and "would hold the input checkpoint, or lie inside it" in inside.stderr
    assert not (Path(model) / "pruned").exists()  # the input is never modified


def test_calibration_ids_outside_the_vocabulary_are_refused_before_anything_is_written(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama", dtype="float32", layers=2)
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    ids = tmp_path / "ids.safetensors"
    save_file({"input_ids": torch.full((4, 16), 3, dtype=torch.int64).index_fill_(1, torch.tensor([5]), vocab + 7)}, ids)
    result = invoke(*prune_args(model, tmp_path / "out", "--calib", ids))
    assert result.exit_code == 1 and only_line(result.stderr, "Error: ") == (
        f"Error: calibration token id {vocab + 7} (from --calib {ids}) is outside the model's vocabulary of {vocab:,} ids; "
        "were they made with another model's tokenizer?")
    assert not (tmp_path / "out").exists()


def test_a_second_ctrl_c_leaves_the_run_interrupted_not_running(tiny_checkpoint, tmp_path, monkeypatch):
    """A KeyboardInterrupt inside a block (a second Ctrl-C stops at once) ends the command with status 130
    and `Error: interrupted; rerun the same command to resume`; the manifest says interrupted, and the same
    command resumes."""
    import streamprune.engine

    model, out = tiny_checkpoint("llama", dtype="float32", layers=3), tmp_path / "out"
    real = streamprune.engine.prune_block

    def stopped_at_block_1(stack, index, *args):
        if index == 1:
            raise KeyboardInterrupt
        return real(stack, index, *args)

    monkeypatch.setattr(streamprune.engine, "prune_block", stopped_at_block_1)
    result = invoke(*prune_args(model, out))
    assert result.exit_code == 130 and result.stderr.strip().splitlines()[-1] == "Error: interrupted; rerun the same command to resume"
    assert manifest(out)["status"] == "interrupted" and manifest(out)["blocks_done"] == 1
    monkeypatch.setattr(streamprune.engine, "prune_block", real)
    resumed = invoke(*prune_args(model, out))
    assert resumed.exit_code == 0 and "resuming the unfinished run" in resumed.stderr and manifest(out)["status"] == "complete"
    monkeypatch.setattr(streamprune.engine, "prune_block", stopped_at_block_1)  # the same command would start over
    over = invoke(*prune_args(model, out, "--overwrite"))
    assert over.exit_code == 130 and over.stderr.strip().splitlines()[-1] == "Error: interrupted; rerun without --overwrite to resume"


def test_the_lock_steps_aside_where_the_file_system_cannot_lock_a_directory(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    """NFS, Lustre without -o flock or SMB refuse flock on a directory (EBADF, ENOSYS, ENOTSUP): a warning,
    and the run goes on unlocked; only a lock held elsewhere (EWOULDBLOCK) refuses, leaving no folder."""
    import errno
    import fcntl

    from streamprune.state import OutputLock

    model = tiny_checkpoint("llama", dtype="float32", layers=2)
    for code in (errno.EBADF, errno.ENOSYS, errno.ENOTSUP):
        monkeypatch.setattr(fcntl, "flock", lambda *_, code=code: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
        lock = OutputLock(tmp_path / f"out{code}", model)
        assert lock.handle is None and f"cannot lock {tmp_path / f'out{code}'}" in caplog.text
        lock.release()
    monkeypatch.setattr(fcntl, "flock", lambda *_: (_ for _ in ()).throw(BlockingIOError(errno.EWOULDBLOCK, "held")))
    with pytest.raises(StreamPruneError, match="another streamprune run is writing to"):
        OutputLock(tmp_path / "held", model)
    assert not (tmp_path / "held").exists()


def test_a_config_and_keyword_options_together_are_refused(tiny_checkpoint, tmp_path):
    from streamprune.config import PruneConfig

    with pytest.raises(StreamPruneError, match=r"give either a PruneConfig or keyword options, not both \(got sparsty beside"):
        streamprune.prune(tiny_checkpoint("llama", layers=2), tmp_path / "out", PruneConfig(method="wanda"), sparsty=0.9)


def test_sigterm_asks_to_stop_without_offering_what_only_ctrl_c_does():
    """SIGTERM (a job scheduler's stop) stops after the block in progress, as Ctrl-C does; its line does
    not offer a second Ctrl-C, which a scheduler does not send."""
    import logging
    import os
    import signal

    from streamprune.engine import stop_requests

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("streamprune")
    logger.addHandler(handler)
    try:
        with stop_requests() as asked:
            os.kill(os.getpid(), signal.SIGTERM)
            assert asked()
    finally:
        logger.removeHandler(handler)
    assert said == ["stopping after the block in progress is written (SIGTERM)"]
