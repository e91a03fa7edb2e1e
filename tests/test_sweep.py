"""The paper's grid as one command: rows, dedupe, resuming without redoing, tables and plots."""

import csv
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import streamprune.sweep
from streamprune.cli import main
from streamprune.data import WIKITEXT_CALIBRATION, WIKITEXT_HELD_OUT
from streamprune.errors import StreamPruneError
from streamprune.sweep import SweepSpec, run_sweep

DATA = Path(__file__).parent / "data"


def spec(**changes):
    settings = dict(
        alphas=(0.0, 1.0), geometries=("original", "modified"), sparsities=(0.5,), calib=str(WIKITEXT_CALIBRATION),
        nsamples=3, calib_seqlen=16, ppl=str(WIKITEXT_HELD_OUT), seqlen=32, max_windows=2, tasks=("boolq",), limit=4,
        data_dir=str(DATA), device="cpu",
    )
    settings.update(changes)
    return SweepSpec(**settings)


@pytest.fixture
def counted_prunes(monkeypatch):
    calls = []
    real = streamprune.sweep.prune

    def counting(model, out, config, **kwargs):
        calls.append((config.method, config.option_values.get("alpha"), config.sparsity, config.pattern))
        return real(model, out, config, **kwargs)

    monkeypatch.setattr(streamprune.sweep, "prune", counting)
    return calls


def test_a_tiny_sweep_gives_every_row_and_prunes_coinciding_configurations_once(tiny_checkpoint, tmp_path, counted_prunes):
    rows = run_sweep(str(tiny_checkpoint("llama")), tmp_path / "sweep", spec(), progress=False, echo=lambda *_: None)
    assert [r["label"] for r in rows] == [
        "dense", "EN-Original a=0 50%", "EN-Original a=1 50%", "EN-Modified a=0 50%", "EN-Modified a=1 50%",
    ]
    assert len(counted_prunes) == 3  # at alpha = 1 the geometries coincide: one pruning serves both
    by_label = {r["label"]: r for r in rows}
    assert by_label["EN-Original a=1 50%"]["ppl"] == by_label["EN-Modified a=1 50%"]["ppl"]
    assert by_label["EN-Original a=0 50%"]["ppl"] != by_label["EN-Modified a=0 50%"]["ppl"]
    assert all(r["ppl"] > 1 and 0 <= r["boolq_acc"] <= 1 and r["macro_mean"] == r["boolq_acc"] for r in rows)
    out = tmp_path / "sweep"
    with (out / "results.csv").open() as handle:
        assert [r["label"] for r in csv.DictReader(handle)] == [r["label"] for r in rows]
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(rows))
    table = (out / "results.md").read_text()
    assert "| alpha | EN-Original ppl | EN-Original macro acc | EN-Modified ppl | EN-Modified macro acc |" in table
    assert "*dense (0%)*" in table and "Best pruned: **" in table
    for plot in ("ppl_vs_alpha_s0.5.png", "macro_mean_vs_alpha_s0.5.png", "ppl_vs_sparsity.png"):
        assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())  # deleted unless --keep


def test_an_interrupted_sweep_continues_without_redoing_finished_configurations(tiny_checkpoint, tmp_path, monkeypatch, counted_prunes):
    model = str(tiny_checkpoint("llama"))
    out = tmp_path / "sweep"
    real_evaluate = streamprune.sweep.evaluate
    evaluations = []

    def failing_third(path, *args, **kwargs):
        evaluations.append(path)
        if len(evaluations) == 3:
            raise KeyboardInterrupt
        return real_evaluate(path, *args, **kwargs)

    monkeypatch.setattr(streamprune.sweep, "evaluate", failing_third)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(model, out, spec(keep=True), progress=False, echo=lambda *_: None)
    assert len(counted_prunes) == 2 and len(list((out / "results").glob("*.json"))) == 2  # dense + one
    monkeypatch.setattr(streamprune.sweep, "evaluate", real_evaluate)
    rows = run_sweep(model, out, spec(keep=True, alphas=(0.0, 0.5, 1.0)), progress=False, echo=lambda *_: None)
    # 5 distinct prunings; the one pruned but not evaluated before the interruption is not pruned again
    assert len(counted_prunes) == 5 and counted_prunes.count(("en-modified", 1.0, 0.5, None)) == 1
    assert len(rows) == 1 + 6
    assert (out / "checkpoints" / "original-a0.5-s0.5" / "model.safetensors.index.json").exists()
    with pytest.raises(StreamPruneError, match="--nsamples differs"):
        run_sweep(model, out, spec(nsamples=4), progress=False, echo=lambda *_: None)


def test_a_sweep_that_stopped_before_any_result_gives_way_to_other_settings(tiny_checkpoint, tmp_path, counted_prunes):
    """A bad input found only once the sweep has begun (a task name lm-eval does not know) leaves its
    settings in OUTDIR; the corrected command starts over without --overwrite, since nothing was done."""
    model = str(tiny_checkpoint("llama"))
    out = tmp_path / "sweep"
    small = dict(alphas=(0.0,), geometries=("original",))
    with pytest.raises(StreamPruneError, match="no_such_task"):
        run_sweep(model, out, spec(**small, tasks=("no_such_task",)), progress=False, echo=lambda *_: None)
    assert (out / "sweep.json").is_file() and not counted_prunes
    (out / "notes.txt").write_text("mine")  # not the sweep's: kept
    rows = run_sweep(model, out, spec(**small), progress=False, echo=lambda *_: None)
    assert (out / "notes.txt").read_text() == "mine"
    assert [r["label"] for r in rows] == ["dense", "EN-Original a=0 50%"] and len(counted_prunes) == 1
    with pytest.raises(StreamPruneError, match="--nsamples differs"):  # once there are results, they are kept
        run_sweep(model, out, spec(**small, nsamples=4), progress=False, echo=lambda *_: None)


def test_a_magnitude_sweep_draws_no_calibration(tiny_checkpoint, tmp_path, counted_prunes):
    """Magnitude pruning runs no block over calibration text, so a corpus that cannot be loaded (the
    default hub corpus offline) stops neither the sweep nor its prunings."""
    rows = run_sweep(str(tiny_checkpoint("llama")), tmp_path / "sweep", spec(methods=("magnitude",), alphas=(), geometries=(),
                     calib=str(tmp_path / "missing.txt")), progress=False, echo=lambda *_: None)
    assert [r["label"] for r in rows] == ["dense", "magnitude 50%"] and len(counted_prunes) == 1
    assert not list((tmp_path / "sweep").glob("calibration_ids*"))


def test_sweep_command_and_spec_file(tiny_checkpoint, tmp_path):
    spec_file = tmp_path / "grid.yaml"
    spec_file.write_text(
        "alphas: [0.5]\ngeometries: [modified]\npatterns: [unstructured, '2:4']\nsparsities: [0.5, 0.6]\n"
        f"calib: {WIKITEXT_CALIBRATION}\nnsamples: 2\ncalib_seqlen: 16\nppl: {WIKITEXT_HELD_OUT}\nseqlen: 32\n"
        "max_windows: 2\ndevice: cpu\n"
    )
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["sweep", str(tiny_checkpoint("llama")), str(out), "--spec", str(spec_file),
                                       "--alphas", "0,0.5", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows[1:]] == [
        "EN-Modified a=0 50%", "EN-Modified a=0.5 50%", "EN-Modified a=0 60%", "EN-Modified a=0.5 60%",
        "EN-Modified a=0 2:4", "EN-Modified a=0.5 2:4",
    ]
    assert "macro_mean" not in rows[0] and (out / "plots" / "ppl_vs_alpha_2of4.png").exists()
    bad = CliRunner().invoke(main, ["sweep", str(tiny_checkpoint("llama")), str(tmp_path / "x"), "--geometries", "squared"])
    assert bad.exit_code == 1 and bad.stderr.startswith("Error: unknown geometry 'squared'")
    # --ppl none: the tasks alone (the default would read WikiText-103 from the hub)
    accuracy = CliRunner().invoke(main, ["sweep", str(tiny_checkpoint("llama")), str(tmp_path / "acc"), "--spec", str(spec_file),
                                         "--ppl", "none", "--tasks", "boolq", "--limit", "4", "--data-dir", str(Path(__file__).parent / "data"),
                                         "--patterns", "unstructured", "--sparsities", "0.5", "--quiet"])
    assert accuracy.exit_code == 0, accuracy.output
    rows = json.loads((tmp_path / "acc" / "results.json").read_text())["rows"]
    assert len(rows) == 2 and all("ppl" not in row and 0 <= row["macro_mean"] <= 1 for row in rows)
    nothing = CliRunner().invoke(main, ["sweep", str(tiny_checkpoint("llama")), str(tmp_path / "none"), "--spec", str(spec_file),
                                        "--ppl", "none"])
    assert nothing.exit_code == 1 and nothing.stderr.startswith("Error: nothing to evaluate"), nothing.stderr


def test_a_grid_over_any_method_its_options_and_reconstruction_prunes_each_distinct_configuration_once(tiny_checkpoint, tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, [
        "sweep", str(tiny_checkpoint("llama")), str(out), "--methods", "wanda,sparsegpt", "--alphas", "0,0.5",
        "--option", "percdamp=0.01,0.1", "--reconstruct", "both", "--calib", str(WIKITEXT_CALIBRATION), "--nsamples", "2",
        "--calib-seqlen", "16", "--ppl", str(WIKITEXT_HELD_OUT), "--seqlen", "32", "--max-windows", "2", "--device", "cpu",
        "--quiet",
    ])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    # alpha is no option of these methods: it multiplies nothing; sparsegpt is never "reconstructed"
    assert [r["label"] for r in rows[1:]] == [
        "wanda 50%", "wanda + reconstruct 50%", "wanda percdamp=0.1 + reconstruct 50%", "sparsegpt 50%", "sparsegpt percdamp=0.1 50%",
    ]
    assert len(list((out / "results").glob("*.json"))) == 1 + 5
    assert rows[4]["options"] == {"percdamp": 0.01, "blocksize": 128} and rows[3]["options"] == {"percdamp": 0.1, "blocksize": 128}
    assert rows[1]["options"] == {} and rows[1]["reconstruct"] is False and rows[2]["reconstruct"] is True
    ppl = {r["label"]: r["ppl"] for r in rows}
    assert ppl["wanda 50%"] != ppl["wanda + reconstruct 50%"] != ppl["wanda percdamp=0.1 + reconstruct 50%"]
    table = (out / "results.md").read_text()
    assert "| configuration | ppl |" in table and "| sparsegpt percdamp=0.1 50% |" in table and "| alpha |" not in table


def test_several_calibration_draws_give_the_mean_and_the_spread(tiny_checkpoint, tmp_path, counted_prunes):
    settings = dict(methods=("wanda",), sparsities=(0.5,), ppl=str(WIKITEXT_HELD_OUT), tasks=())
    rows = run_sweep(str(tiny_checkpoint("llama")), tmp_path / "sweep", spec(seeds=2, **settings), progress=False, echo=lambda *_: None)
    row = rows[1]
    assert len(counted_prunes) == 2 and row["seeds"] == 2
    first, second = row["ppl_seeds"]
    assert first != second and row["ppl"] == pytest.approx((first + second) / 2)
    assert row["ppl_std"] == pytest.approx(abs(first - second) / 2 ** 0.5) and row["ppl_min"] == min(first, second)
    assert (tmp_path / "sweep" / "calibration_ids-seed1.safetensors").exists()
    assert f"{row['ppl']:.2f} ± {row['ppl_std']:.2f}" in (tmp_path / "sweep" / "results.md").read_text()
    rows = run_sweep(str(tiny_checkpoint("llama")), tmp_path / "sweep", spec(seeds=3, **settings), progress=False, echo=lambda *_: None)
    assert len(counted_prunes) == 3 and len(rows[1]["ppl_seeds"]) == 3  # a third draw, the first two kept


def test_a_grid_over_other_fields_prunes_once_per_pruning_setting_and_evaluates_each(tiny_checkpoint, tmp_path, counted_prunes):
    model = str(tiny_checkpoint("llama"))
    common = ["--methods", "wanda", "--calib", str(WIKITEXT_CALIBRATION), "--calib-seqlen", "16", "--ppl", str(WIKITEXT_HELD_OUT),
              "--max-windows", "2", "--device", "cpu", "--quiet"]
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["sweep", model, str(out), *common, "--grid", "nsamples=2,3", "--grid", "seqlen=16,32"])
    assert result.exit_code == 0, result.output
    assert len(counted_prunes) == 2  # seqlen is an evaluation field: one pruning per nsamples
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == [
        f"{name} [nsamples={n} seqlen={q}]" for n in (2, 3) for q in (16, 32) for name in ("dense", "wanda 50%")
    ]
    ppl = {r["label"]: r["ppl"] for r in rows}
    assert ppl["dense [nsamples=2 seqlen=16]"] == ppl["dense [nsamples=3 seqlen=16]"] != ppl["dense [nsamples=2 seqlen=32]"]
    assert ppl["wanda 50% [nsamples=2 seqlen=32]"] != ppl["wanda 50% [nsamples=3 seqlen=32]"]
    assert sorted(p.name for p in out.glob("calibration_ids*")) == [
        "calibration_ids-nsamples2.safetensors", "calibration_ids-nsamples3.safetensors"]
    table = (out / "results.md").read_text()
    assert "# nsamples=3 seqlen=32" in table and (out / "plots" / "nsamples3-seqlen32" / "ppl_vs_sparsity.png").exists()

    # a setting's numbers are those of a sweep run with its values and no grid
    alone = tmp_path / "alone"
    assert CliRunner().invoke(main, ["sweep", model, str(alone), *common, "--nsamples", "3", "--seqlen", "32"]).exit_code == 0
    plain = json.loads((alone / "results.json").read_text())["rows"]
    assert [r["ppl"] for r in plain] == [ppl["dense [nsamples=3 seqlen=32]"], ppl["wanda 50% [nsamples=3 seqlen=32]"]]

    # a rerun redoes nothing; a grown grid does only what is new
    assert CliRunner().invoke(main, ["sweep", model, str(out), *common, "--grid", "nsamples=2,3", "--grid", "seqlen=16,32"]).exit_code == 0
    assert len(counted_prunes) == 3
    recorded = json.loads((out / "sweep.json").read_text())
    del recorded["budgets"]  # as a sweep of a version before --budgets recorded it: the default then
    (out / "sweep.json").write_text(json.dumps(recorded))
    grown = CliRunner().invoke(main, ["sweep", model, str(out), *common, "--grid", "nsamples=2,3,4", "--grid", "seqlen=16,32"])
    assert grown.exit_code == 0 and len(counted_prunes) == 4 and "[1/1] wanda 50% [nsamples=4]: pruning and evaluating (2 evaluation settings)" in grown.output

    for grid, fragment in (("seed=1,2", "cannot vary 'seed' (it is an axis of its own: seeds)"),
                           ("alphas=0,1", "cannot vary 'alphas' (it is an axis of its own: alphas)"),
                           ("nsamples=two", "gives nsamples the value 'two', not a whole number"),
                           ("colour=red", "cannot vary 'colour'")):
        bad = CliRunner().invoke(main, ["sweep", model, str(tmp_path / "bad"), *common, "--grid", grid])
        assert bad.exit_code == 1 and bad.stderr.startswith(f"Error: the sweep's grid {fragment}"), bad.stderr


def test_a_sweep_over_budgets_and_owl_options(tiny_checkpoint, tmp_path, counted_prunes):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, [
        "sweep", str(tiny_checkpoint("llama")), str(out), "--methods", "wanda", "--sparsities", "0.6", "--patterns", "unstructured,2:4",
        "--grid", "budgets=uniform,owl", "--option", "owl_lambda=0.05,0.1", "--calib", str(WIKITEXT_CALIBRATION), "--nsamples", "2",
        "--calib-seqlen", "16", "--ppl", str(WIKITEXT_HELD_OUT), "--seqlen", "32", "--max-windows", "2", "--device", "cpu", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows] == [
        "dense [budgets=uniform]", "wanda 60% [budgets=uniform]", "wanda 2:4 [budgets=uniform]",
        "dense [budgets=owl]", "wanda owl_lambda=0.05 60% [budgets=owl]", "wanda owl_lambda=0.1 60% [budgets=owl]",
    ]
    assert len(counted_prunes) == 4 and rows[0]["ppl"] == rows[3]["ppl"]  # one dense evaluation serves both
    assert len({r["ppl"] for r in rows[1:3] + rows[4:]}) == 4
    assert ("Warning: --budgets owl gives each block a sparsity of its own, which an N:M pattern fixes at N/M: 2:4 left out "
            "where the budgets are owl") in result.stderr
    with pytest.raises(StreamPruneError, match=re.escape("the grid is empty: --budgets owl gives each block a sparsity of its own, "
                                                         "which an N:M pattern (2:4) fixes at N/M; give sparsities, or --budgets uniform")):
        SweepSpec(methods=("wanda",), patterns=("2:4",), budgets="owl")


def test_a_sweep_takes_en_auto_as_a_method(tiny_checkpoint, tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, [
        "sweep", str(tiny_checkpoint("llama")), str(out), "--methods", "en-modified,en-auto", "--alphas", "0.5",
        "--calib", str(WIKITEXT_CALIBRATION), "--nsamples", "2", "--calib-seqlen", "16", "--ppl", str(WIKITEXT_HELD_OUT),
        "--seqlen", "32", "--max-windows", "2", "--device", "cpu", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["label"] for r in rows[1:]] == ["EN-Modified a=0.5 50%", "en-auto 50%"]
    assert rows[2]["options"] == {"alphas": [0.0, 0.25, 0.5, 0.75, 1.0], "geometry": "modified", "auto_windows": 8}
    assert "| en-auto 50% |" in (out / "results.md").read_text()


def test_the_same_sweep_started_twice_is_refused_while_the_first_runs(tiny_checkpoint, tmp_path):
    """A sweep holds its directory's lock (state.OutputLock) while it runs: a second one into it is
    refused at once and writes nothing; once the first ends, the directory is the first's."""
    from streamprune.state import OutputLock

    model, out = tiny_checkpoint("llama"), tmp_path / "sweep"
    spec = SweepSpec(methods=("magnitude",), sparsities=(0.5,), ppl=str(WIKITEXT_HELD_OUT), seqlen=32, max_windows=1, device="cpu")
    held = OutputLock(out, model)
    with pytest.raises(StreamPruneError, match=re.escape(f"another streamprune run is writing to {out} now")):
        run_sweep(str(model), out, spec, progress=False, echo=lambda *_: None)
    assert list(out.iterdir()) == []
    held.release()
    rows = run_sweep(str(model), out, spec, progress=False, echo=lambda *_: None)
    assert [row["label"] for row in rows] == ["dense", "magnitude 50%"]
