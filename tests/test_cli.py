"""The command line through click's test runner: results, summaries, one-line errors."""

import json
import shutil

import pytest
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from streamprune.cli import main
from streamprune.data import WIKITEXT_CALIBRATION

WIKI = str(WIKITEXT_CALIBRATION)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_prune_writes_a_loadable_checkpoint_and_a_summary(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = invoke("prune", tiny_checkpoint("llama"), out, "--method", "en-original", "--alpha", "0.25",
                    "--sparsity", "0.6", "--calib", WIKI, "--nsamples", "3", "--seqlen", "16", "--quiet")
    assert result.exit_code == 0, result.output
    assert "Pruned 3 blocks with en-original, alpha 0.25" in result.stdout
    manifest = json.loads((out / "streamprune.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["sparsity"] == 0.6
    assert set(manifest["sparsity"].values()) == {round(int(0.6 * 64) / 64, 6), round(int(0.6 * 160) / 160, 6)}
    AutoModelForCausalLM.from_pretrained(out)


def test_pattern_sets_the_sparsity(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = invoke("prune", tiny_checkpoint("llama"), out, "--pattern", "2:4", "--calib", WIKI, "--nsamples", "2",
                    "--seqlen", "16", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "streamprune.json").read_text())
    assert manifest["config"]["pattern"] == "2:4" and manifest["config"]["sparsity"] == 0.5


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--alpha", "1.5"], ["alpha must be in [0, 1]"]),
        (["--sparsity", "1"], ["sparsity must be in [0, 1)"]),
        (["--sparsity", "-0.1"], ["sparsity must be in [0, 1)"]),
        (["--pattern", "4:2"], ["0 < N < M"]),
        (["--pattern", "2-4"], ["N:M"]),
        (["--pattern", "3:7"], ["not divisible by 7"]),
        (["--method", "sparse-gpt"], ["--method"]),
        (["--method", "wanda", "--alpha", "0.3"], ["--alpha does not apply to wanda, which takes no options"]),
        (["--method", "wanda", "--percdamp", "0.1"], ["--percdamp does not apply to wanda", "option of --reconstruct"]),
        (["--method", "sparsegpt", "--reconstruct"], ["sparsegpt updates the kept weights itself"]),
        (["--method", "sparsegpt", "--blocksize", "0"], ["--blocksize must be in [1, "]),
        (["--method", "en-auto", "--auto-windows", "0"], ["--auto-windows must be in [1, 1048576], got 0"]),
        (["--method", "sparsegpt", "--pattern", "2:4", "--blocksize", "6"], ["--blocksize 6 is not a multiple of M = 4"]),
        (["--nsamples", "0"], ["--nsamples must be at least 1"]),
        (["--device", "mps"], ["device mps is not supported; use cpu, cuda or cuda:N"]),
        (["--calib", "no-such-corpus"], ["calibration source"]),
        (["--device", "cuda:0"], ["CUDA is not available"]),
    ],
)
def test_bad_options_give_one_line_errors(tiny_checkpoint, tmp_path, options, fragments):
    if "cuda:0" in options:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    result = invoke("prune", tiny_checkpoint("llama"), out, "--calib", WIKI, "--nsamples", "2", "--seqlen", "16",
                    "--quiet", *options)
    assert_one_line_error(result, *fragments)
    assert not (out / "model.safetensors.index.json").exists()


def test_too_little_calibration_text_is_an_error_and_a_long_seqlen_a_warning(tiny_checkpoint, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of text.")
    result = invoke("prune", tiny_checkpoint("llama"), tmp_path / "a", "--calib", short, "--seqlen", "64", "--quiet")
    assert_one_line_error(result, "fewer than one window", "--seqlen")
    assert not (tmp_path / "a").exists()  # nothing is created before the calibration data is known to be good
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = invoke("prune", tiny_checkpoint("llama"), tmp_path / "b", "--calib", empty, "--seqlen", "8", "--quiet")
    assert_one_line_error(result, "fewer than one window")
    result = invoke("prune", tiny_checkpoint("llama"), tmp_path / "c", "--calib", WIKI, "--nsamples", "1",
                    "--seqlen", "4100", "--quiet")
    assert result.exit_code == 0, result.output
    assert "Warning: seqlen 4100 is above the model's context of 4096 tokens" in result.stderr


def test_bad_checkpoints_give_one_line_errors(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama")
    cases = {}
    cases["missing"] = (tmp_path / "nope", ["does not exist"])
    no_config = tmp_path / "no-config"
    shutil.copytree(source, no_config)
    (no_config / "config.json").unlink()
    cases["no-config"] = (no_config, ["no config.json"])
    missing_shard = tmp_path / "missing-shard"
    shutil.copytree(source, missing_shard)
    next(missing_shard.glob("model-00002-*.safetensors")).unlink()
    cases["missing-shard"] = (missing_shard, ["model-00002", "missing"])
    corrupt = tmp_path / "corrupt"
    shutil.copytree(source, corrupt)
    shard = next(corrupt.glob("model-00003-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    cases["corrupt"] = (corrupt, ["model-00003", "safetensors"])
    pickle_only = tmp_path / "pickle-only"
    pickle_only.mkdir()
    shutil.copy(source / "config.json", pickle_only)
    (pickle_only / "pytorch_model.bin").write_bytes(b"not read")
    cases["pickle"] = (pickle_only, ["pickle", "safetensors only"])
    foreign = tmp_path / "foreign"
    shutil.copytree(source, foreign)
    config = json.loads((foreign / "config.json").read_text())
    config["model_type"] = "gpt2"
    (foreign / "config.json").write_text(json.dumps(config))
    cases["architecture"] = (foreign, ["gpt2 is not supported", "transformer.h.0.attn.c_attn.weight", "Conv1D"])
    unknown = tmp_path / "unknown"  # a model type transformers itself does not know
    shutil.copytree(foreign, unknown)
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "no_such_arch"}))
    cases["unknown"] = (unknown, ["model type 'no_such_arch' is unknown to transformers", "streamprune families"])
    more_blocks = tmp_path / "more-blocks"  # 3 blocks stored, 2 declared: block 2 would vanish
    shutil.copytree(source, more_blocks)
    config = json.loads((more_blocks / "config.json").read_text())
    (more_blocks / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    cases["more-blocks"] = (more_blocks, ["blocks up to 2", "num_hidden_layers = 2"])
    wrong_shape = tmp_path / "wrong-shape"
    shutil.copytree(source, wrong_shape)
    config = json.loads((wrong_shape / "config.json").read_text())
    config["intermediate_size"] = 96
    (wrong_shape / "config.json").write_text(json.dumps(config))
    cases["shape"] = (wrong_shape, ["does not match its config.json", "the config implies [96, 64]"])
    for name, (model, fragments) in cases.items():
        out = tmp_path / f"out-{name}"
        result = invoke("prune", model, out, "--calib", WIKI, "--nsamples", "2", "--seqlen", "16", "--quiet")
        assert_one_line_error(result, *fragments)
        assert not (out / "model.safetensors.index.json").exists(), name


def test_output_directory_rules(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama")
    common = ["--calib", WIKI, "--nsamples", "2", "--seqlen", "16", "--quiet"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_one_line_error(invoke("prune", model, a_file, *common), "is a file")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert_one_line_error(invoke("prune", model, foreign, *common), "not made by streamprune", "--overwrite")
    assert (foreign / "notes.txt").exists()
    assert_one_line_error(invoke("prune", model, model, *common), "would hold the input")
    done = tmp_path / "done"
    assert invoke("prune", model, done, *common).exit_code == 0
    assert_one_line_error(invoke("prune", model, done, *common), "already holds a complete run", "--overwrite")
    assert invoke("prune", model, done, *common, "--overwrite", "--seed", "3").exit_code == 0


def test_more_bad_inputs_give_one_line_errors(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama")
    common = ["--calib", WIKI, "--nsamples", "2", "--seqlen", "16", "--quiet"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_one_line_error(invoke("prune", model, a_file / "sub", *common), "is a file")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({
        "model_type": "custom_thing", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"},
    }))
    assert_one_line_error(invoke("prune", remote, tmp_path / "o1", *common), "--trust-remote-code")
    # evaluation holds to the same standard
    assert_one_line_error(invoke("eval", tmp_path / "nope", "--ppl", WIKI), "does not exist")
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    next(broken.glob("model-00002-*.safetensors")).unlink()
    assert_one_line_error(invoke("eval", broken, "--ppl", WIKI, "--quiet"), "model-00002", "missing")
    assert_one_line_error(invoke("eval", remote, "--ppl", WIKI), "--trust-remote-code")
    assert_one_line_error(invoke("eval", model, "--ppl", WIKI, "--json", a_file / "r.json"), "--json", "is a file")
    assert_one_line_error(invoke("eval", model, "--ppl", WIKI, "--baseline", tmp_path / "nope"), "does not exist")
    assert_one_line_error(invoke("eval", model, "--tasks", "boolq", "--ppl-slices", "7"), "--ppl-slices needs --ppl")
    bad_data = tmp_path / "data"
    (bad_data / "boolq").mkdir(parents=True)
    (bad_data / "boolq" / "val.jsonl").write_text('{"passage": "p", "question": "q", "label": "maybe"}\n')
    assert_one_line_error(invoke("eval", model, "--tasks", "boolq", "--data-dir", bad_data, "--quiet"), "line 1", "maybe")
    (bad_data / "boolq" / "val.jsonl").write_text("")
    assert_one_line_error(invoke("eval", model, "--tasks", "boolq", "--data-dir", bad_data, "--quiet"), "no examples")
    (bad_data / "phishing").mkdir()
    (bad_data / "phishing" / "dataset_phishing_url_status.csv").write_text("url,status\nhttp://a.example,spam\n")
    assert_one_line_error(invoke("eval", model, "--tasks", "phishing", "--data-dir", bad_data, "--quiet"), "line 2", "spam")


def test_a_run_killed_before_its_first_manifest_starts_again(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "calibration_ids.safetensors").write_bytes(b"half")  # all a run leaves before its manifest
    (out / ".model-00001-of-00004.safetensors.tmp").write_bytes(b"")
    result = invoke("prune", model, out, "--calib", WIKI, "--nsamples", "2", "--seqlen", "16", "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "streamprune.json").read_text())["status"] == "complete"


def test_inspect_reports_damage_on_stdout_and_exits_one_without_an_error_line(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert invoke("prune", tiny_checkpoint("llama"), out, "--calib", WIKI, "--nsamples", "2", "--seqlen", "16",
                  "--quiet").exit_code == 0
    next(out.glob("model-00002-*.safetensors")).unlink()
    result = invoke("inspect", out)
    assert result.exit_code == 1
    assert "missing" in result.stdout and result.stderr == ""


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("prune", tmp_path / "nope", tmp_path / "out", "--debug")
    assert result.exit_code != 0
    assert "does not exist" in str(result.exception)


def test_the_readme_method_table_is_the_registry():
    from pathlib import Path

    from streamprune.cli import methods_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert methods_table() in readme  # regenerate with: streamprune methods
    assert invoke("methods").stdout.strip() == methods_table()


def test_gpu_out_of_memory_is_one_line_with_what_to_do(tiny_checkpoint, tmp_path, monkeypatch):
    import torch

    import streamprune.engine as engine

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.6 GiB")

    monkeypatch.setattr(engine, "_prune_blocks", out_of_memory)
    out = tmp_path / "out"
    result = invoke("prune", tiny_checkpoint("llama"), out, "--calib", WIKI, "--nsamples", "2", "--seqlen", "16", "--quiet")
    assert_one_line_error(result, "GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)", "--batch-size", "--offload cpu")
    assert "GPU 0 has" not in result.stderr  # two sentences: the rest is the allocator's detail
    assert json.loads((out / "streamprune.json").read_text())["status"] == "failed"


def test_inspect_json_goes_into_a_new_folder_and_eval_ppl_none_means_no_perplexity(tiny_checkpoint, tmp_path):
    """`inspect --json` makes its folder, as `eval --json` does, rather than failing after the report; and
    `eval --ppl none` is no perplexity, as in `sweep`, not a file named none."""
    from pathlib import Path

    model = tiny_checkpoint("llama", layers=2)
    report = tmp_path / "new" / "inspect.json"
    result = invoke("inspect", model, "--json", report)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["problems"] == []
    results = tmp_path / "eval.json"
    data = Path(__file__).parent / "data"
    result = invoke("eval", model, "--ppl", "none", "--tasks", "boolq", "--limit", "2", "--data-dir", data, "--quiet", "--json", results)
    assert result.exit_code == 0, result.output
    assert "ppl" not in json.loads(results.read_text()) and json.loads(results.read_text())["tasks"]["boolq"]["n"] == 2
    result = invoke("eval", model, "--tasks", "phishing", "--limit", "1000", "--data-dir", data, "--quiet", "--json", results)
    assert result.exit_code == 0 and json.loads(results.read_text())["tasks"]["phishing"]["n"] == 60
    assert f"Warning: --limit 1000 is more than the 60 examples of phishing in {data}: all are evaluated" in result.stderr.splitlines()


def test_a_folder_that_cannot_be_written_is_named_in_one_plain_line():
    """An OSError naming a path that cannot be written (an immutable folder, where even root cannot write,
    or another user's) reaches the user as what it is, not as a Python exception's repr."""
    import click

    from streamprune.cli import reports_errors

    @click.command()
    @reports_errors
    def writes():
        raise PermissionError(1, "Operation not permitted", "/data/sweeps/run")

    result = CliRunner().invoke(writes, [])
    assert result.exit_code == 1 and result.stderr.strip() == (
        "Error: cannot access /data/sweeps/run: Operation not permitted (--debug shows where)")


def test_a_misspelt_keyword_of_the_python_api_is_named_with_the_closest_setting():
    from streamprune.config import PruneConfig
    from streamprune.errors import StreamPruneError

    with pytest.raises(StreamPruneError, match=r"^unknown argument 'sparsty' \(did you mean 'sparsity'\?\): neither a pruning setting"):
        PruneConfig.of(method="wanda", sparsty=0.5)
    with pytest.raises(StreamPruneError, match=r"^unknown argument 'calib_seqlen': "):
        PruneConfig.of(method="en-modified", calib_seqlen=64)
    with pytest.raises(StreamPruneError, match="--alpha does not apply to wanda"):  # another method's option, as before
        PruneConfig.of(method="wanda", alpha=0.5)
    assert PruneConfig.of(method="en-modified", alpha=0.25).option_values["alpha"] == 0.25
