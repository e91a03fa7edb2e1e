"""StreamedLM, streamprune's lm-evaluation-harness backend, against lm-eval's own Hugging Face backend.

The tasks are local YAMLs over tests/data (tests/data/lmeval): BoolQ and HellaSwag (multiple choice),
a generative task made from a few WikiText lines, and a rolling log-likelihood task; both backends run
them through lm_eval.simple_evaluate on the same tiny float64 checkpoint.
"""

import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

lm_eval = pytest.importorskip("lm_eval")  # the optional extra; tools/setup-env installs it

from lm_eval.models.huggingface import HFLM  # noqa: E402

from streamprune.evaluate.generation import generate  # noqa: E402
from streamprune.evaluate.harness import StreamedLM  # noqa: E402
from streamprune.errors import StreamPruneError  # noqa: E402
from streamprune.loading import open_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["sp_boolq", "sp_hellaswag", "sp_continue", "sp_rolling"]


def evaluate(lm, limit=None):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(ROOT / "tests/data/lmeval"))
    return lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=manager, limit=limit, bootstrap_iters=0,
                                   log_samples=True)


def test_streamed_backend_equals_lm_evals_hf_backend(tiny_checkpoint, monkeypatch):
    monkeypatch.chdir(ROOT)  # the YAMLs name their data files from the repository root
    model_dir = tiny_checkpoint("llama", layers=2)
    streamed = evaluate(StreamedLM(pretrained=str(model_dir), device="cpu", batch_size=3, progress=False))
    whole = evaluate(HFLM(pretrained=str(model_dir), device="cpu", dtype="float64", batch_size=3))
    for task in TASKS:
        ours, theirs = streamed["results"][task], whole["results"][task]
        metrics = [k for k in theirs if k.endswith(",none") and not k.endswith("_stderr,none")]
        assert metrics, task
        for metric in metrics:
            assert ours[metric] == pytest.approx(theirs[metric], rel=1e-9, abs=1e-12), (task, metric)
    # the answers themselves, not only their averages
    for task in ("sp_boolq", "sp_hellaswag"):
        for a, b in zip(streamed["samples"][task], whole["samples"][task]):
            assert len(a["resps"]) == len(b["resps"]) > 1
            for [(ll_a, greedy_a)], [(ll_b, greedy_b)] in zip(a["resps"], b["resps"]):
                assert float(ll_a) == pytest.approx(float(ll_b), rel=1e-9) and greedy_a == greedy_b
    generated = [s["resps"][0][0] for s in streamed["samples"]["sp_continue"]]
    assert generated == [s["resps"][0][0] for s in whole["samples"]["sp_continue"]]
    assert any(generated)  # something was generated


def _recorded_starts(monkeypatch) -> list:
    """What each loglikelihood._Contexts is made for, recorded: the prefixes of scoring and the starts of
    greedy generation (which uses the same class) that run once per block."""
    from streamprune.evaluate import loglikelihood

    made, init = [], loglikelihood._Contexts.__init__
    monkeypatch.setattr(loglikelihood._Contexts, "__init__", lambda self, groups, inputs, stack: init(self, groups, inputs, stack) or made.extend(groups))
    return made


def _samples(task: str, *lms) -> list:
    """lm-eval's samples of a task of tests/data/lmeval (its first 12 documents) for each backend."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(ROOT / "tests/data/lmeval"))
    return [lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=12, bootstrap_iters=0, log_samples=True)["samples"][task]
            for lm in lms]


def test_a_few_shot_tasks_examples_run_once_with_the_hf_backends_numbers(tiny_checkpoint, monkeypatch):
    """sp_hellaswag_fewshot (three examples before each question, lm-eval's first_n sampler): the prompts
    of the 12 questions begin with the same 450 tokens, which 10 of them share, running them once (3
    prefixes, not 12; the other two, 188 and 159 tokens past them with 4 endings each, cost less on
    their own: 450 - 3 x 188 < 0), and every answer's log-likelihood and greedy flag equal lm-eval's HF
    backend's."""
    monkeypatch.chdir(ROOT)
    prefixes = _recorded_starts(monkeypatch)
    model_dir = tiny_checkpoint("llama", layers=2)
    streamed, whole = _samples("sp_hellaswag_fewshot", StreamedLM(pretrained=str(model_dir), device="cpu", batch_size=3, progress=False),
                               HFLM(pretrained=str(model_dir), device="cpu", dtype="float64", batch_size=3))
    assert sorted((len(group.prefix), sum(map(len, group.rests.values()))) for group in prefixes) == [(450, 40), (609, 4), (638, 4)]
    assert len(streamed) == 12 and streamed[5]["arguments"][0][0].count("\n\n") == 3  # three examples before its own
    for a, b in zip(streamed, whole):
        for [(ll_a, greedy_a)], [(ll_b, greedy_b)] in zip(a["resps"], b["resps"]):
            assert float(ll_a) == pytest.approx(float(ll_b), rel=1e-9) and greedy_a == greedy_b


def test_a_few_shot_generative_tasks_examples_are_read_once_with_the_hf_backends_generations(tiny_checkpoint, monkeypatch):
    """sp_continue_fewshot (three examples before each prompt, first_n): the 12 prompts begin with the same
    examples, which greedy generation reads once (one shared start, cut one token short of the shortest
    prompt), and every generation equals lm-eval's HF backend's."""
    monkeypatch.chdir(ROOT)
    starts = _recorded_starts(monkeypatch)
    model_dir = tiny_checkpoint("llama", layers=2)
    lms = (StreamedLM(pretrained=str(model_dir), device="cpu", batch_size=3, progress=False),
           HFLM(pretrained=str(model_dir), device="cpu", dtype="float64", batch_size=3))
    streamed, whole = _samples("sp_continue_fewshot", *lms)
    prompts = [lms[0].tok_encode(s["arguments"][0][0]) for s in streamed]
    examples = streamed[5]["arguments"][0][0].rsplit("\n\n", 1)[0]
    assert len(streamed) == 12 and examples.count("\n\n") == 2  # three examples before its own
    common = min(next(i for i, (x, y) in enumerate(zip(prompts[0], p)) if x != y) for p in prompts[1:])
    assert common > len(lms[0].tok_encode(examples))
    assert [len(start.prefix) for start in starts] == [min(common, min(map(len, prompts)) - 1)]
    generated = [s["resps"][0][0] for s in streamed]
    assert generated == [s["resps"][0][0] for s in whole] and any(generated)
    starts.clear()  # share_contexts=false reads every prompt whole
    (unshared,) = _samples("sp_continue_fewshot", StreamedLM(pretrained=str(model_dir), device="cpu", batch_size=3, progress=False,
                                                            share_contexts=False))
    assert starts == [] and [s["resps"][0][0] for s in unshared] == generated


def test_rolling_loglikelihood_covers_each_token_once(tiny_checkpoint):
    """A text longer than max_length: lm-eval's rolling windows score every token once, the first given
    the prefix token; the sum equals the whole model's on the same windows."""
    from lm_eval.api.instance import Instance

    model_dir = tiny_checkpoint("llama", layers=2)
    lm = StreamedLM(pretrained=str(model_dir), device="cpu", max_length=16, progress=False)
    text = "The tower is 324 metres tall, about the same height as an 81-storey building."
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    tokens = lm.tok_encode(text)
    assert len(tokens) > 16
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    expected, done = 0.0, 0
    with torch.no_grad():
        while done < len(tokens):  # windows of 16 predictions, each with the 16 tokens before it
            end = min(done + 16, len(tokens))
            inputs = ([lm.prefix_token_id] + tokens)[max(0, end - 16) : end]
            log_probs = model(input_ids=torch.tensor([inputs])).logits[0].log_softmax(-1)
            targets = tokens[max(0, end - 16) : end]
            picked = log_probs[torch.arange(len(targets)), torch.tensor(targets)]
            expected += picked[len(targets) - (end - done) :].sum().item()
            done = end
    assert total == pytest.approx(expected, rel=1e-10)
    assert math.isfinite(total) and total < 0
    # a continuation of exactly max_length tokens is scored; one more cannot be (HFLM: a bare AssertionError)
    fits = lm.tok_encode(text)[:16]
    assert len(lm._loglikelihood_tokens([(None, [1], fits)])) == 1
    with pytest.raises(StreamPruneError, match="a continuation of 17 tokens does not fit max_length 16 .*raise max_length"):
        lm._loglikelihood_tokens([(None, [1], fits + [2])])


def test_eval_runs_lm_eval_tasks_beside_the_built_in_ones(tiny_checkpoint, monkeypatch, tmp_path):
    """`streamprune eval --tasks boolq,sp_boolq --include-path ...`: the built-in BoolQ and the same questions
    as an lm-eval YAML task give the same accuracy on all 60 examples; lm-eval's metrics land in the JSON;
    --max-resident-tokens reaches the backend's scoring."""
    import json

    from click.testing import CliRunner

    from streamprune.cli import main
    from streamprune.evaluate import harness

    monkeypatch.chdir(ROOT)
    seen = []
    scoring = harness.streamed_logprobs
    monkeypatch.setattr(harness, "streamed_logprobs", lambda *a, **k: seen.append(k["max_resident_tokens"]) or scoring(*a, **k))
    model_dir = tiny_checkpoint("llama", layers=2)
    out = tmp_path / "results.json"
    result = CliRunner().invoke(main, ["eval", str(model_dir), "--tasks", "boolq,sp_boolq,sp_rolling", "--include-path",
                                       "tests/data/lmeval", "--data-dir", "tests/data", "--quiet", "--json", str(out),
                                       "--max-resident-tokens", "4096"])
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {4096}
    tasks = json.loads(out.read_text())["tasks"]
    assert tasks["sp_boolq"]["n"] == tasks["boolq"]["n"] == 60
    assert tasks["sp_boolq"]["acc"] == pytest.approx(tasks["boolq"]["acc"])
    assert tasks["sp_boolq"]["source"] == "lm-eval" and "acc_stderr" in tasks["sp_boolq"]
    assert tasks["sp_rolling"]["primary"] == "word_perplexity" and not tasks["sp_rolling"]["in_macro_mean"]
    assert tasks["macro_mean"] == pytest.approx(tasks["boolq"]["acc"])
    assert json.loads(out.read_text())["versions"]["lm_eval"] == lm_eval.__version__
    assert "sp_boolq acc (lm-eval, n=60)" in result.output
    assert result.stderr == ""  # --quiet reaches lm-eval's own bars (building requests, tokenising) too


def test_eval_no_share_contexts_reads_every_request_whole_with_the_same_results(tiny_checkpoint, monkeypatch, tmp_path):
    """`streamprune eval --no-share-contexts` reaches the built-in tasks' scoring, lm-eval's scoring and
    greedy generation: no context or start is shared (HellaSwag's endings, the few-shot examples of
    sp_continue_fewshot), and the results are those of the default, which shares both.  The work each
    reports (a line beside the table, and the JSON's) counts the same 54 requests taking the same positions
    alone: fewer through each block shared, at least as many read whole."""
    import json

    from click.testing import CliRunner

    from streamprune.cli import main

    monkeypatch.chdir(ROOT)
    shared = _recorded_starts(monkeypatch)
    model_dir = tiny_checkpoint("llama", layers=2)
    results = []
    for switch in ("--share-contexts", "--no-share-contexts"):
        shared.clear()
        out = tmp_path / f"{switch}.json"
        result = CliRunner().invoke(main, ["eval", str(model_dir), "--tasks", "hellaswag,sp_hellaswag,sp_continue_fewshot", "--include-path",
                                           "tests/data/lmeval", "--data-dir", "tests/data", "--limit", "6", "--device", "cpu", "--json", str(out), switch])
        assert result.exit_code == 0, result.output
        results.append(json.loads(out.read_text()))
        assert bool(shared) == (switch == "--share-contexts"), switch
        work = results[-1]["work"]  # 6 x 4 endings of each HellaSwag, 6 continuations
        assert f"token positions through each block for 54 requests; read one by one they would take {work['alone']:,} ({work['ratio']:.2f}x)" in result.stderr
    assert results[1]["options"]["share_contexts"] is False
    assert results[1]["options"]["dtype"] == "auto" and results[1]["computed_in"] == {"device": "cpu", "dtype": "float64"}
    shared_work, whole_work = results[0]["work"], results[1]["work"]
    assert shared_work["requests"] == whole_work["requests"] == 54 and shared_work["alone"] == whole_work["alone"]
    # read whole, padding only adds (no answer of one token here, whose rows would be one as ever)
    assert shared_work["positions"] < shared_work["alone"] <= whole_work["positions"]
    for task in ("hellaswag", "sp_hellaswag", "sp_continue_fewshot"):
        shared_run, whole = results[0]["tasks"][task], results[1]["tasks"][task]
        assert shared_run["primary"] == whole["primary"] and shared_run[shared_run["primary"]] == pytest.approx(whole[whole["primary"]], abs=1e-12)


def test_a_group_counts_its_subtasks_documents_and_a_task_without_metrics_is_named(tiny_checkpoint, monkeypatch, tmp_path):
    """sp_group (sp_boolq + sp_hellaswag, its own acc weighted by size) reports n = 3 + 3, and only its acc
    enters the macro mean.  A task whose YAML names a metric lm-eval does not know is refused before
    anything runs (lm-eval would drop the metric); a task left without a metric gives no number: a
    warning names it, and the table and JSON are still written."""
    import contextlib
    import json

    from click.testing import CliRunner

    from streamprune.cli import main
    from streamprune.evaluate import runner

    monkeypatch.chdir(ROOT)
    model_dir = str(tiny_checkpoint("llama", layers=2))
    out = tmp_path / "results.json"
    result = CliRunner().invoke(main, ["eval", model_dir, "--tasks", "sp_group", "--include-path", "tests/data/lmeval",
                                       "--limit", "3", "--quiet", "--json", str(out)])
    assert result.exit_code == 0, result.output
    tasks = json.loads(out.read_text())["tasks"]
    assert (tasks["sp_group"]["n"], tasks["sp_boolq"]["n"], tasks["sp_hellaswag"]["n"]) == (6, 3, 3)
    assert tasks["sp_group"]["acc"] == pytest.approx((tasks["sp_boolq"]["acc"] + tasks["sp_hellaswag"]["acc"]) / 2)
    assert tasks["macro_mean"] == tasks["sp_group"]["acc"] and not tasks["sp_boolq"]["in_macro_mean"]
    assert "sp_group acc (lm-eval, n=6)" in result.stdout
    assert "sp_boolq acc (lm-eval, n=3, in its group)" in result.stdout  # not a row of its own in the macro mean

    unknown = tmp_path / "tasks"
    unknown.mkdir()
    (unknown / "sp_unknown_metric.yaml").write_text((ROOT / "tests/data/lmeval/sp_boolq.yaml").read_text()
                                                    .replace("task: sp_boolq", "task: sp_unknown_metric").replace("metric: acc", "metric: acc_nrom"))
    out.unlink()

    def unknown_metric():
        return CliRunner().invoke(main, ["eval", model_dir, "--tasks", "sp_unknown_metric", "--include-path", str(unknown),
                                         "--limit", "3", "--quiet", "--json", str(out)])

    result = unknown_metric()  # refused while lm-eval builds the task, before any request runs
    assert result.exit_code == 1 and result.stderr.startswith("Error: UnknownMetric: its metric_list names 'acc_nrom', which is "
                                                              "neither one of lm-eval's metrics (acc, ")
    assert "(lm-eval task sp_unknown_metric)" in result.stderr and not out.exists()
    # were lm-eval to drop it without its log record, the results would still say the task has no metric
    monkeypatch.setattr(runner, "unknown_metrics_refused", contextlib.nullcontext)
    result = unknown_metric()
    assert result.exit_code == 0, result.output
    assert "Warning: lm-eval computed no metric for task sp_unknown_metric: check the metric_list of its YAML" in result.stderr
    assert result.stdout.splitlines()[0] == "(no metrics)" and json.loads(out.read_text())["tasks"] == {"macro_mean": None}


def test_a_task_scored_through_a_named_filter_enters_the_macro_mean(tiny_checkpoint, monkeypatch, tmp_path):
    """gsm8k's exact_match comes under its filters' names (exact_match,strict-match): it is still the task's
    accuracy, and enters the macro mean beside sp_boolq's acc."""
    import json

    from click.testing import CliRunner

    from streamprune.cli import main

    monkeypatch.chdir(ROOT)
    filtered = (ROOT / "tests/data/lmeval/sp_continue.yaml").read_text().replace("task: sp_continue", "task: sp_filtered")
    (tmp_path / "sp_filtered.yaml").write_text(filtered + "filter_list:\n  - name: strict-match\n    filter:\n"
                                               "      - function: regex\n        regex_pattern: \"(.*)\"\n"
                                               "      - function: take_first\n")
    (tmp_path / "sp_boolq.yaml").write_text((ROOT / "tests/data/lmeval/sp_boolq.yaml").read_text())
    out = tmp_path / "results.json"
    result = CliRunner().invoke(main, ["eval", str(tiny_checkpoint("llama", layers=2)), "--tasks", "sp_filtered,sp_boolq",
                                       "--include-path", str(tmp_path), "--limit", "14", "--quiet", "--json", str(out)])
    assert result.exit_code == 0, result.output
    # lm-eval takes a limit beyond a task's documents quietly
    assert "Warning: --limit 14 is more than the 12 examples of sp_filtered: all are evaluated" in result.stderr.splitlines()
    assert "sp_boolq: all" not in result.stderr
    tasks = json.loads(out.read_text())["tasks"]
    assert tasks["sp_filtered"]["primary"] == "exact_match,strict-match" and tasks["sp_filtered"]["in_macro_mean"]
    assert tasks["macro_mean"] == pytest.approx((tasks["sp_filtered"]["exact_match,strict-match"] + tasks["sp_boolq"]["acc"]) / 2)


def test_an_unknown_task_names_the_yaml_files_lm_eval_could_not_read(tiny_checkpoint, tmp_path, monkeypatch):
    """lm-eval skips a YAML it cannot parse without a word; the error says which file held no task, and
    when the task asked for is found, a warning still names the files passed over."""
    from click.testing import CliRunner

    from streamprune.cli import main

    (tmp_path / "broken_task.yaml").write_text("task: broken_task\ndataset_path: json\n  output_type: [\n")
    (tmp_path / "fine.yaml").write_text((ROOT / "tests/data/lmeval/sp_continue.yaml").read_text())
    (tmp_path / "_template.yaml").write_text("dataset_path: json\ndoc_to_text: !function utils.text\n")  # no task: fine
    (tmp_path / "other.yml").write_text((ROOT / "tests/data/lmeval/sp_continue.yaml").read_text().replace("sp_continue", "other"))
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "broken_task.yaml").write_text("[")  # lm-eval does not look there
    result = CliRunner().invoke(main, ["eval", str(tiny_checkpoint("llama", layers=2)), "--tasks", "broken_task",
                                       "--include-path", str(tmp_path), "--quiet"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: unknown task 'broken_task'")
    skipped = ("lm-eval skipped broken_task.yaml (a YAML error at line 3: mapping values are not allowed here), other.yml "
               "(it reads only .yaml files)")
    assert result.stderr.rstrip().endswith("; " + skipped)
    # a task of the folder that is there: evaluated, and the files lm-eval passed over named all the same
    monkeypatch.chdir(ROOT)  # where the task's data_files are
    result = CliRunner().invoke(main, ["eval", str(tiny_checkpoint("llama", layers=2)), "--tasks", "sp_continue",
                                       "--include-path", str(tmp_path), "--limit", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.stderr == f"Warning: {skipped} under {tmp_path}: a task, group or tag defined there is not evaluated\n"


def test_an_error_in_a_tasks_own_code_names_the_task(tiny_checkpoint, monkeypatch, tmp_path):
    """lm-eval's message for a template's misspelt field, a data file that is not there, a misspelt YAML key,
    a few-shot or test split the data lacks, more few-shot examples than it holds, an empty answer choice, a metric
    given an option it does not take, does not say which task (and a misspelt metric, which lm-eval drops, is refused);
    streamprune's one-line error does, and what to change: where relative paths are read from, the YAML
    file, the splits there are, to ask for fewer examples (first_n's assertion, the default sampler's
    random.sample), to set num_beams 1 for a beam search; lm-eval's own "Error: " is not repeated."""
    from click.testing import CliRunner

    from streamprune.cli import main

    monkeypatch.chdir(ROOT)
    boolq = (ROOT / "tests/data/lmeval/sp_boolq.yaml").read_text()
    (tmp_path / "bad_field.yaml").write_text(boolq.replace("task: sp_boolq", "task: bad_field").replace("{{question}}", "{{questoin}}"))
    (tmp_path / "no_file.yaml").write_text(boolq.replace("task: sp_boolq", "task: no_file").replace("boolq/val.jsonl", "boolq/missing.jsonl"))
    (tmp_path / "bad_key.yaml").write_text(boolq.replace("task: sp_boolq", "task: bad_key\nfewshot_splt: validation"))
    (tmp_path / "no_split.yaml").write_text(boolq.replace("task: sp_boolq", "task: no_split\nfewshot_split: dev\nnum_fewshot: 1"))
    (tmp_path / "too_many.yaml").write_text(boolq.replace("task: sp_boolq", "task: too_many\nfewshot_split: validation\n"
                                                          "num_fewshot: 61\nfewshot_config:\n  sampler: first_n"))
    (tmp_path / "plain.yaml").write_text(boolq.replace("task: sp_boolq", "task: plain"))
    (tmp_path / "bad_metric.yaml").write_text(boolq.replace("task: sp_boolq", "task: bad_metric").replace("metric: acc\n", "metric: acc_nrom\n"))
    (tmp_path / "test_split.yaml").write_text(boolq.replace("task: sp_boolq", "task: test_split").replace("validation_split: validation", "test_split: validation")
                                              .replace("    validation: tests/", "    test: tests/"))
    continue_ = (ROOT / "tests/data/lmeval/sp_continue.yaml").read_text()
    (tmp_path / "metric_option.yaml").write_text(continue_.replace("task: sp_continue", "task: metric_option")
                                                 .replace("higher_is_better: true", "higher_is_better: true\n    ignore_whitespace: true"))
    (tmp_path / "empty_choice.yaml").write_text(boolq.replace("task: sp_boolq", "task: empty_choice").replace('["no", "yes"]', '["", "yes"]'))
    (tmp_path / "beams.yaml").write_text((ROOT / "tests/data/lmeval/sp_continue.yaml").read_text()
                                         .replace("task: sp_continue", "task: beams").replace("do_sample: false", "do_sample: false\n  num_beams: 2"))
    fewer = "; it asks for more few-shot examples than its few-shot split holds: ask for fewer (num_fewshot in its YAML, or the command's option))"
    for task, said, more in (
            ("bad_field", "UndefinedError: 'questoin' is undefined (lm-eval task bad_field) (rerun with --debug", []),
            ("no_file", "missing.jsonl' (lm-eval task no_file; relative paths in a task YAML are read from the folder "
                        "you run in) (rerun with --debug", []),
            ("bad_key", f"'fewshot_splt' (lm-eval task bad_key; its YAML {tmp_path / 'bad_key.yaml'} has a key lm-eval does "
                        "not know: misspelt?)", []),
            ("no_split", "KeyError: 'dev' (lm-eval task no_split; its fewshot_split is not one of its dataset's: validation)", []),
            ("too_many", "Error: AssertionError: number of fewshot samples requested exceeds the 60 that are available. "
                         f"(lm-eval task too_many{fewer}", []),
            ("plain", f"Sample larger than population or is negative (lm-eval task plain{fewer}", ["--num-fewshot", "61"]),
            ("bad_metric", "Error: UnknownMetric: its metric_list names 'acc_nrom', which is neither one of lm-eval's metrics (acc, ", []),
            ("test_split", "KeyError: 'validation' (lm-eval task test_split; its test_split is not one of its dataset's: test)", []),
            ("metric_option", "(lm-eval task metric_option; its metric_list gives a metric an option the metric does not take", []),
            ("empty_choice", "IndexError: string index out of range (lm-eval task empty_choice; an answer choice of its first "
                             "document is empty (doc_to_choice), which lm-eval cannot build a task with: give every choice some text)", []),
            ("beams", "Error: streamed generation decodes greedily or samples, one sequence at a time; the task's generation_kwargs "
                      "with the model's generation config ask for beam search (do_sample False, num_beams 2); set num_beams 1 in "
                      "the task's generation_kwargs (lm-eval task beams)", [])):
        result = CliRunner().invoke(main, ["eval", str(tiny_checkpoint("llama", layers=2)), "--tasks", task,
                                           "--include-path", str(tmp_path), "--limit", "2", "--quiet", *more])
        assert result.exit_code == 1, result.output
        assert said in result.stderr.splitlines()[-1], (said, result.stderr.splitlines()[-1])


def test_lm_evals_bars_write_whole_lines_in_a_log(tiny_checkpoint, monkeypatch, tmp_path):
    """stderr is not a terminal here: lm-eval's request-building bar prints lines, no carriage returns, and
    lm-eval's own tqdm is back in place afterwards.  What lm-eval prints (its line before bootstrapping a
    stderr, made here for acc, whose stderr it computes in closed form) goes to stderr: stdout is the table."""
    import tqdm
    from click.testing import CliRunner

    import datasets.config
    import lm_eval.api.task
    import lm_eval.evaluator_utils
    from streamprune.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # datasets prepares the split: its bar
    real = lm_eval.evaluator_utils.stderr_for_metric
    monkeypatch.setattr(lm_eval.evaluator_utils, "stderr_for_metric",
                        lambda metric, bootstrap_iters: print("bootstrapping for stddev:", metric.__name__) or real(metric, bootstrap_iters))
    result = CliRunner().invoke(main, ["eval", str(tiny_checkpoint("llama", layers=2)), "--tasks", "sp_boolq",
                                       "--include-path", "tests/data/lmeval", "--limit", "3"])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    assert "Building requests: 0/3 it [00:00<?, ?it/s]" in lines
    # a bar a terminal would clear (leave=False) still ends with its final state in a log
    assert any(line.startswith("lm-eval loglikelihood: 3/3 block [") for line in lines), lines
    assert "bootstrapping for stddev: mean" in result.stderr.splitlines()
    assert [line.split("  ")[0] for line in result.stdout.splitlines()] == ["sp_boolq acc (lm-eval, n=3)", "macro mean accuracy"]
    assert lm_eval.api.task.tqdm is tqdm.tqdm


def test_a_task_whose_dataset_cannot_be_reached_says_what_to_do_offline(tiny_checkpoint, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from streamprune.cli import main

    def offline(**_):  # what datasets raises for a hub dataset offline (lm-eval's arc_easy: allenai/ai2_arc)
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    out = tmp_path / "results.json"
    result = CliRunner().invoke(main, ["eval", str(tiny_checkpoint("llama", layers=2)), "--tasks", "sp_boolq", "--include-path",
                                       "tests/data/lmeval", "--quiet", "--json", str(out)])
    assert result.exit_code == 1 and not out.exists()
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: lm-eval could not load a task's dataset (Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)); "
        "offline, write a task YAML over local files (dataset_path: json, with data_files) and pass its folder with --include-path")


def test_lm_eval_command_with_the_streamprune_model_prints_the_hf_backends_numbers(tiny_checkpoint, monkeypatch, capsys):
    import sys

    from streamprune.lm_eval_cli import main as lm_eval_main

    monkeypatch.chdir(ROOT)
    model_dir = tiny_checkpoint("llama", layers=2)
    tables = []
    # HFLM takes the device from --device only (lm-eval fills it in); StreamedLM also from --model_args
    for model, args in (("streamprune", [f"pretrained={model_dir},device=cpu,dtype=float64"]),
                        ("hf", [f"pretrained={model_dir},dtype=float64", "--device", "cpu"])):
        monkeypatch.setattr(sys, "argv", ["streamprune-lm-eval", "--model", model, "--model_args", *args, "--tasks", "sp_hellaswag",
                                          "--include_path", "tests/data/lmeval", "--limit", "12"])
        lm_eval_main()
        said = capsys.readouterr()
        tables.append([line for line in said.out.splitlines() if line.startswith("|")])
        # streamprune's work, after lm-eval's table: 12 questions of 4 endings
        assert (model == "streamprune") == bool(re.search(r"^streamprune: [\d,]+ token positions through each block for 48 requests; "
                                                          r"read one by one they would take [\d,]+ \(0\.\d\dx\)$", said.err, re.M))
    assert len(tables[0]) >= 4 and tables[0] == tables[1]


def test_lm_evals_default_device_on_a_machine_without_cuda_means_auto(tiny_checkpoint, monkeypatch, caplog):
    """lm-eval's command fills in --device cuda:0 when none is given; HFLM then takes the device it has,
    and so does StreamedLM, saying so.  A bare --device cuda (which HFLM keeps, and fails on) and a CUDA
    device asked for in --model_args are errors when CUDA is not there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    model_dir = tiny_checkpoint("llama", layers=2)
    lm = StreamedLM.create_from_arg_string(f"pretrained={model_dir},progress=false", {"device": "cuda:0", "batch_size": 2})
    assert lm.stack.device == torch.device("cpu") and lm._batch_size == 2
    assert "lm-eval's --device cuda:0 is not on this machine; streamprune chooses the device itself" in caplog.text
    for model_args, command in ((f"pretrained={model_dir},device=cuda:0", {"device": "cpu"}), (f"pretrained={model_dir}", {"device": "cuda"})):
        with pytest.raises(StreamPruneError, match="device cuda(:0)? was asked for but CUDA is not available here; use cpu"):
            StreamedLM.create_from_arg_string(model_args, command)
    with pytest.raises(StreamPruneError, match="streamprune needs the model: pretrained=DIR in --model_args"):
        StreamedLM.create_from_arg_string("device=cpu", {})
    caplog.clear()  # a misspelt device is refused before lm-eval's default device is warned about
    with pytest.raises(StreamPruneError, match="unknown --model_args devce for streamprune"):
        StreamedLM.create_from_arg_string(f"pretrained={model_dir},devce=cpu", {"device": "cuda:0"})
    assert "is not on this machine" not in caplog.text


def test_lm_eval_finds_the_installed_backend_by_its_entry_point(tiny_checkpoint):
    """setup.cfg declares StreamedLM in lm-eval's plugin group `lm_eval.models`. With an lm-eval that
    discovers plugins (its main branch since PR 4013), plain `lm_eval --model streamprune` runs, in a process
    that never imported streamprune itself, and prints the HF backend's table; with one that does not
    (0.4.13), it fails as README says, and streamprune-lm-eval is the way."""
    import importlib.metadata as md
    import subprocess
    import sys

    from lm_eval.api import registry

    entries = [e for e in md.entry_points(group="lm_eval.models") if e.name == "streamprune"]
    assert len(entries) == 1, "the installed metadata lacks setup.cfg's entry point: pip install -e . again"
    assert entries[0].load() is StreamedLM
    model_dir = tiny_checkpoint("llama", layers=2)

    def lm_eval_command(model, *args):
        return subprocess.run([sys.executable, "-m", "lm_eval", "--model", model, "--model_args", *args,
                               "--tasks", "sp_boolq", "--include_path", "tests/data/lmeval", "--limit", "8"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)

    streamed = lm_eval_command("streamprune", f"pretrained={model_dir},device=cpu,dtype=float64")
    if not hasattr(registry, "load_plugins"):
        assert streamed.returncode != 0 and "'streamprune', but no model for this name found" in streamed.stderr
        return
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    hf = lm_eval_command("hf", f"pretrained={model_dir},dtype=float64", "--device", "cpu")
    tables = [[line for line in run.stdout.splitlines() if line.startswith("|")] for run in (streamed, hf)]
    assert len(tables[0]) >= 3 and tables[0] == tables[1]


def test_a_sweep_evaluates_lm_eval_tasks(tiny_checkpoint, monkeypatch, tmp_path):
    from streamprune.data import WIKITEXT_CALIBRATION
    from streamprune.sweep import SweepSpec, run_sweep

    monkeypatch.chdir(ROOT)
    spec = SweepSpec(alphas=(0.5,), geometries=("modified",), sparsities=(0.5,), calib=str(WIKITEXT_CALIBRATION), nsamples=3,
                     calib_seqlen=16, ppl=None, tasks=("sp_boolq", "sp_hellaswag", "sp_rolling"), limit=6,
                     include_path="tests/data/lmeval", device="cpu", num_fewshot=1)
    from lm_eval import tasks

    from streamprune.evaluate import runner

    built, original = [], tasks.TaskManager
    monkeypatch.setattr(tasks, "TaskManager", lambda **kwargs: built.append(kwargs) or original(**kwargs))
    runner._TASK_MANAGERS.clear()
    rows = run_sweep(str(tiny_checkpoint("llama", layers=2)), tmp_path / "sweep", spec, progress=False, echo=lambda *_: None)
    assert [r["label"] for r in rows] == ["dense", "EN-Modified a=0.5 50%"]
    assert built == [{"include_path": "tests/data/lmeval"}]  # lm-eval's tasks indexed once for both evaluations
    for row in rows:  # a perplexity is not averaged with accuracies
        assert row["macro_mean"] == pytest.approx((row["sp_boolq_acc"] + row["sp_hellaswag_acc"]) / 2)
        assert row["sp_rolling_word_perplexity"] > 1
    # results.md's table of every configuration has every metric of every task, not only the primary ones
    table = (tmp_path / "sweep" / "results.md").read_text()
    assert ("| configuration | sp_boolq_acc | sp_hellaswag_acc | sp_hellaswag_acc_norm | sp_rolling_word_perplexity | "
            "sp_rolling_byte_perplexity | sp_rolling_bits_per_byte | macro_mean | prune s | eval s |") in table
    assert "lm-eval tasks: 1-shot (--num-fewshot); the built-in tasks zero-shot." in table


def test_lm_evals_task_index_is_built_again_only_when_a_yaml_under_the_include_path_changes(tmp_path, monkeypatch, capsys):
    """The TaskManager (lm-eval's index of its tasks, seconds to build) is reused while the YAML files under
    --include-path are unchanged; a file added or rewritten makes a new one, which knows the new task.
    With progress on, a line says so whenever one is built (lm-eval itself shows nothing meanwhile)."""
    from lm_eval import tasks

    from streamprune.evaluate import runner

    class Index:  # stands for lm-eval's: the tasks of the folder
        def __init__(self, include_path):
            self.all_tasks = sorted(path.stem for path in Path(include_path).glob("*.yaml"))

    monkeypatch.setattr(tasks, "TaskManager", Index)
    monkeypatch.setattr(runner, "_TASK_MANAGERS", {})
    (tmp_path / "one.yaml").write_text("task: one\n")
    config = runner.EvalConfig(tasks=("one",), include_path=str(tmp_path))
    first = runner._task_manager(config, progress=True)
    assert runner._task_manager(config, progress=True) is first
    assert capsys.readouterr().err == f"Indexing lm-eval's tasks (its task YAMLs and {tmp_path}'s; about 10 s on a small CPU) ...\n"
    (tmp_path / "two.yaml").write_text("task: two\n")
    second = runner._task_manager(runner.EvalConfig(tasks=("two",), include_path=str(tmp_path)))
    assert second is not first and second.all_tasks == ["one", "two"] and capsys.readouterr().err == ""
    (tmp_path / "two.yaml").write_text("task: two\ndescription: rewritten\n")
    assert runner._task_manager(config) is not second


def test_generation_stops_at_a_stop_id_or_string_and_bad_model_args_are_refused(tiny_checkpoint):
    from streamprune.errors import StreamPruneError

    model_dir = tiny_checkpoint("llama", layers=2)
    stack = open_model(model_dir, device="cpu").stack
    context = list(range(20, 31))
    (free,) = generate(stack, [context], 10)
    (stopped,) = generate(stack, [context], 10, stop_ids={free[3]})
    assert stopped == free[: free.index(free[3]) + 1]  # up to and with the first stop id
    tokenizer = open_model(model_dir, device="cpu").tokenizer
    text = tokenizer.decode(free[:5])
    (cut,) = generate(stack, [context], 10, tokenizer, until=[text[-1]])
    assert text[-1] in tokenizer.decode(cut) and len(cut) <= 5
    with pytest.raises(StreamPruneError, match="unknown --model_args revision"):
        StreamedLM(pretrained=str(model_dir), device="cpu", revision="main")
    with pytest.raises(StreamPruneError, match="batch_size"):
        StreamedLM(pretrained=str(model_dir), device="cpu", batch_size="many")
    # bad values are refused too, not read as something else (a typo must not turn sharing off)
    for args, fragment in (({"share_contexts": "maybe"}, "share_contexts must be true or false, not 'maybe'"),
                           ({"dtype": "int8"}, "unknown dtype 'int8'; use auto, "),
                           ({"max_length": "abc"}, "max_length must be a whole number, not 'abc'"),
                           ({"offload_dir": str(model_dir / "missing")}, "is not a folder")):
        with pytest.raises(StreamPruneError, match=re.escape(fragment)):
            StreamedLM(pretrained=str(model_dir), device="cpu", **args)
    assert StreamedLM(pretrained=str(model_dir), device="cpu", share_contexts="off", progress="0").share_contexts is False


def test_lm_eval_command_reports_bad_model_args_in_one_line(tiny_checkpoint, monkeypatch, capsys, tmp_path):
    """streamprune-lm-eval: a StreamPruneError is one `Error: ...` line on stderr and exit status 1."""
    import sys

    from streamprune.lm_eval_cli import main as lm_eval_main

    monkeypatch.chdir(ROOT)
    model_dir = tiny_checkpoint("llama", layers=2)
    monkeypatch.setattr(sys, "argv", ["streamprune-lm-eval", "--model", "streamprune", "--model_args",
                                      f"pretrained={model_dir},device=cpu,revision=main", "--tasks", "sp_boolq",
                                      "--include_path", "tests/data/lmeval", "--limit", "2"])
    with pytest.raises(SystemExit) as exit_:
        lm_eval_main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "StreamPruneError" not in err  # no traceback of it (lm-eval's own logging may print other noise here)
    assert err.splitlines()[-1].startswith("Error: unknown --model_args revision for streamprune; it takes pretrained, ")
    # lm-eval's own errors and Ctrl-C are one line too (a process of its own: lm-eval's log handlers of
    # earlier tests write to streams pytest has closed, and report that with tracebacks)
    import subprocess

    run = subprocess.run([sys.executable, "-m", "streamprune.lm_eval_cli", "--model", "streamprune", "--model_args",
                          f"pretrained={model_dir},device=cpu", "--tasks", "sp_boolqq", "--include_path", "tests/data/lmeval",
                          "--limit", "2"], capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1] == ("Error: ValueError: Tasks not found: sp_boolqq (did you mean 'sp_boolq'?) (rerun with "
                                           "STREAMPRUNE_DEBUG=1 for the traceback)")
    # a misspelt --include_path, which lm-eval passes over, and a task YAML lm-eval skipped, are named
    (tmp_path / "broken.yaml").write_text("task: broken\n  output_type: [\n")
    for include_path, said in (("tests/data/lmevl", "Error: --include_path tests/data/lmevl is not a folder; give the folder of your task YAMLs"),
                               (str(tmp_path), "; lm-eval skipped broken.yaml (a YAML error at line 2")):
        monkeypatch.setattr(sys, "argv", ["streamprune-lm-eval", "--model", "streamprune", "--model_args", f"pretrained={model_dir}",
                                          "--tasks", "broken", f"--include_path={include_path}"])
        with pytest.raises(SystemExit) as exit_:
            lm_eval_main()
        err = capsys.readouterr().err.splitlines()
        assert exit_.value.code == 1 and said in err[-1]
        # named before lm-eval runs too: had the tasks been found, the evaluation would go on without them
        assert any(line.startswith("Warning: lm-eval skipped broken.yaml (a YAML error at line 2") for line in err) == (include_path == str(tmp_path))
    import lm_eval.__main__

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", interrupted)
    with pytest.raises(SystemExit) as exit_:
        lm_eval_main()
    assert exit_.value.code == 130 and capsys.readouterr().err.splitlines()[-1] == "Error: interrupted"


def test_chat_templates_are_applied_as_the_hf_backend_applies_them(tiny_checkpoint, monkeypatch, tmp_path):
    """lm-eval's --apply_chat_template with a system instruction: the same prompts, so the same answers."""
    import shutil

    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    monkeypatch.chdir(ROOT)
    model_dir = tmp_path / "chat"
    shutil.copytree(tiny_checkpoint("llama", layers=2), model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    tokenizer.save_pretrained(model_dir)
    outputs = [lm_eval.simple_evaluate(model=lm, tasks=["sp_boolq", "sp_continue"], limit=6, bootstrap_iters=0,
                                       log_samples=True, task_manager=TaskManager(include_path=str(ROOT / "tests/data/lmeval")),
                                       apply_chat_template=True, system_instruction="Answer briefly.")
               for lm in (StreamedLM(pretrained=str(model_dir), device="cpu", progress=False),
                          HFLM(pretrained=str(model_dir), device="cpu", dtype="float64", batch_size=3))]
    prompts = [[s["arguments"][0][0] for s in out["samples"]["sp_boolq"]] for out in outputs]
    assert prompts[0] == prompts[1] and prompts[0][0].startswith("<system>Answer briefly.")
    for a, b in zip(outputs[0]["samples"]["sp_boolq"], outputs[1]["samples"]["sp_boolq"]):
        for [(ll_a, _)], [(ll_b, _)] in zip(a["resps"], b["resps"]):
            assert float(ll_a) == pytest.approx(float(ll_b), rel=1e-9)
    assert [s["resps"] for s in outputs[0]["samples"]["sp_continue"]] == [s["resps"] for s in outputs[1]["samples"]["sp_continue"]]


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _with_json(source, target, name, **values):
    """A copy of checkpoint `source` at `target` whose JSON file `name` has `values` set."""
    import json
    import shutil

    shutil.copytree(source, target)
    path = target / name
    data = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**data, **values}))
    return str(target)


def test_generation_applies_the_greedy_settings_hf_generate_applies(tiny_checkpoint, tmp_path):
    """HFLM hands the task's generation arguments to HF generate, which adds the model's generation config
    (generation_config.json, else config.json): a repetition penalty (Qwen2.5-Instruct ships 1.05) and
    no_repeat_ngram_size change greedy choices and are applied; the EOS ids of config.json end a
    generation when there is no generation_config.json; other settings that would change the choices,
    beam search, a sampling temperature of 0 (HFLM's when a sampling task gives none), several sequences
    a request and arguments that are no generation setting are refused, naming where they came from."""
    from streamprune.errors import StreamPruneError

    base = tiny_checkpoint("llama", layers=2)
    prompts = ["Once upon a time", "The capital of France is", "x"]
    plain = [(p, {"until": [], "max_gen_toks": 24}) for p in prompts]

    def both(model_dir, args):
        streamed = StreamedLM(pretrained=str(model_dir), device="cpu", batch_size=2, progress=False).generate_until(_requests("generate_until", args))
        whole = HFLM(pretrained=str(model_dir), device="cpu", dtype="float64", batch_size=2).generate_until(_requests("generate_until", args))
        assert streamed == whole
        return streamed

    free = both(base, plain)
    # a sampling model config (do_sample, as chat models ship), made greedy by the task's do_sample false
    penalised = _with_json(base, tmp_path / "penalised", "generation_config.json", repetition_penalty=1.3, do_sample=True, temperature=0.7)
    assert both(penalised, plain) != free
    # without generation_config.json, transformers reads config.json's generation settings
    assert both(_with_json(base, tmp_path / "legacy", "config.json", repetition_penalty=1.3), plain) != free
    # and the model's max_new_tokens wins over the max_length HFLM passes
    assert both(_with_json(base, tmp_path / "capped", "generation_config.json", max_new_tokens=5), plain) != free
    assert both(base, [(p, {**kwargs, "no_repeat_ngram_size": 2}) for p, kwargs in plain]) != free
    lm = StreamedLM(pretrained=str(base), device="cpu", progress=False)
    (tokens,) = generate(lm.stack, [lm.tok_encode(prompts[0])], 24)
    ends = _with_json(base, tmp_path / "ends", "config.json", eos_token_id=[lm.tokenizer.eos_token_id, tokens[4]])
    assert len(both(ends, plain)[0]) < len(free[0])
    for extra, fragment in (({"min_new_tokens": 3}, "the task's generation arguments (with --gen_kwargs) set min_new_tokens = 3, which"),
                            ({"foo": 1}, "foo in the task's generation arguments (with --gen_kwargs) is not a generation setting (HF generate"),
                            ({"max_length": 40}, "set max_length"),
                            ({"do_sample": True, "temperature": 0.5, "num_beams": 2}, "decodes greedily or samples, one sequence at a time; the task's "
                                                                  "generation arguments (with --gen_kwargs) with the model's generation "
                                                                  "config ask for beam sample (do_sample True, num_beams 2); set num_beams 1 "
                                                                  "in the task's generation arguments (with --gen_kwargs)"),
                            ({"do_sample": True}, "the task's generation arguments (with --gen_kwargs) ask for sampling (do_sample true) "
                                                  "without a temperature; lm-eval's HF backend then passes temperature 0.0, over the "
                                                  "model's own, which HF generate refuses: give a temperature above 0"),
                            ({"do_sample": True, "temperature": 0.0}, "the task's generation arguments (with --gen_kwargs) set temperature "
                                                                      "= 0.0, which HF generate refuses for sampling: `temperature` (=0.0) "
                                                                      "has to be a strictly positive float"),
                            ({"prompt_lookup_num_tokens": 3}, "ask for assisted generation (do_sample False, prompt_lookup_num_tokens 3); "
                                                              "remove prompt_lookup_num_tokens in the task's generation arguments"),
                            ({"stop_strings": ["x"]}, "set stop_strings = ['x'], which streamed generation does not apply; HF generate "
                                                      "would, and its text would differ"),
                            ({"do_sample": True, "temperature": 0.5, "top_k": -1}, "set top_k = -1, which HF generate refuses for sampling: `top_k` has to be a strictly positive"),
                            ({"num_return_sequences": 2}, "with the model's generation config (config.json) are refused by HF generate: "
                                                          "Greedy methods (do_sample != True) without beam search do not support `num_return_sequences`"),
                            ({"do_sample": True, "temperature": 0.5, "num_return_sequences": 2}, "set num_return_sequences = 2; lm-eval reads "
                                                                                                 "one sequence a request"),
                            ({"num_beams": 2}, "ask for beam search (do_sample False, num_beams 2)")):
        with pytest.raises(StreamPruneError, match=re.escape(fragment)):
            lm.generate_until(_requests("generate_until", [("x", {"until": [], "max_gen_toks": 4, **extra})]))
    for name in ("generation_config.json", "config.json"):
        suppressing = _with_json(base, tmp_path / f"suppressing-{name}", name, suppress_tokens=[250])
        with pytest.raises(StreamPruneError, match=re.escape(f"the model's generation config ({name}) set suppress_tokens")):
            StreamedLM(pretrained=suppressing, device="cpu", progress=False).generate_until(_requests("generate_until", plain))


def test_sampled_requests_draw_what_hf_generate_draws_for_each_alone(tiny_checkpoint, monkeypatch, tmp_path):
    """do_sample: each request is sampled with its own generator, seeded from torch's seed and the
    request (_request_seeds): its text is HF generate's for it alone after torch.manual_seed(that seed),
    with HF's default top_k of 50 (the vocabulary has 256), the same whatever batch_size or
    share_contexts, and a request given twice draws twice, in one group or in two (two generation
    settings).  Neither sampling nor greedy decoding moves torch's global generator.
    Through lm_eval.simple_evaluate (which seeds torch) a sampling task's samples are the same run after
    run, with another task beside it, or with a smaller --limit, and not the greedy ones."""
    from streamprune.evaluate.harness import _request_seeds

    model_dir = tiny_checkpoint("llama", layers=2)
    prompts = ["Once upon a time", "The capital of France is", "x", "Once upon a time", "Two"]
    settings = [{"until": [], "max_gen_toks": 10, "do_sample": True, "temperature": t} for t in (0.8, 0.8, 0.8, 0.8, 1.2)]
    requests = _requests("generate_until", list(zip(prompts, settings)))
    lm = StreamedLM(pretrained=str(model_dir), device="cpu", batch_size=3, progress=False)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    ours = lm.generate_until(requests)
    assert torch.equal(torch.get_rng_state(), state)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    expected = []
    for seed, prompt, setting in zip(_request_seeds(requests, 1234), prompts, settings):
        ids = torch.tensor([lm.tok_encode(prompt)])
        torch.manual_seed(seed)
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=True, temperature=setting["temperature"],
                             pad_token_id=lm.tokenizer.pad_token_id)[0, ids.shape[1] :]
        expected.append(lm.tok_decode(new.tolist()))
    assert ours == expected and ours[0] != ours[3]
    torch.manual_seed(1234)
    assert StreamedLM(pretrained=str(model_dir), device="cpu", batch_size=1, progress=False, share_contexts=False).generate_until(requests) == ours
    torch.manual_seed(1235)
    assert lm.generate_until(requests) != ours  # another seed of torch's, other draws
    greedy = lm.generate_until(_requests("generate_until", [(p, {"until": [], "max_gen_toks": 10, "do_sample": False}) for p in prompts]))
    assert greedy != ours and torch.initial_seed() == 1235 and torch.equal(torch.get_rng_state(), torch.manual_seed(1235).get_state())
    # a sampling task through lm-eval, which seeds torch: the same texts whatever else the run holds
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)
    continue_ = (ROOT / "tests/data/lmeval/sp_continue.yaml").read_text()
    (tmp_path / "sampled.yaml").write_text(continue_.replace("task: sp_continue", "task: sampled")
                                           .replace("do_sample: false", "do_sample: true\n  temperature: 0.8"))
    (tmp_path / "sp_continue.yaml").write_text(continue_)
    manager = TaskManager(include_path=str(tmp_path))

    def samples(model_lm, tasks, limit=6, task="sampled"):
        output = lm_eval.simple_evaluate(model=model_lm, tasks=tasks, task_manager=manager, limit=limit, bootstrap_iters=0, log_samples=True)
        return [s["resps"][0][0] for s in output["samples"][task]]

    sampled = samples(lm, ["sampled"])
    assert any(sampled) and sampled != samples(lm, ["sp_continue"], task="sp_continue")
    assert samples(StreamedLM(pretrained=str(model_dir), device="cpu", batch_size=2, progress=False), ["sampled"]) == sampled
    assert samples(lm, ["sp_continue", "sampled"]) == sampled
    assert samples(lm, ["sampled"], limit=4) == sampled[:4]


def test_sampling_without_a_temperature_is_refused_in_one_line(tiny_checkpoint, caplog):
    """lm-eval warns of do_sample with temperature 0 in a line of its own ('do_sample=True` but
    temperature=0.0 ...') before streamprune's refusal; that warning is left out, the refusal says it all."""
    import logging

    from lm_eval.utils import warning_once

    lm = StreamedLM(pretrained=str(tiny_checkpoint("llama", layers=2)), device="cpu", progress=False)
    for settings in ({"do_sample": True}, {"do_sample": True, "temperature": 0}):
        warning_once.cache_clear()  # lm-eval says it once per process
        with caplog.at_level(logging.WARNING), pytest.raises(StreamPruneError, match="temperature"):
            lm.generate_until(_requests("generate_until", [("x", {"until": [], "max_gen_toks": 4, **settings})]))
        assert not [r for r in caplog.records if "temperature=0.0" in r.getMessage()], caplog.text
    assert logging.getLogger("lm_eval.models.utils").level == logging.NOTSET  # put back


def test_eval_seed_is_lm_evals_seed(tiny_checkpoint, monkeypatch, tmp_path):
    """streamprune eval --seed N seeds lm-eval as lm_eval --seed N does: a sampled task's requests are
    drawn under torch's seed N (lm-eval's 1234 without it); for the built-in tasks alone it is refused."""
    from click.testing import CliRunner

    from streamprune.cli import main
    from streamprune.evaluate import harness

    seen, original = [], harness.StreamedLM.generate_until
    monkeypatch.setattr(harness.StreamedLM, "generate_until",
                        lambda self, requests, *args, **kwargs: seen.append(torch.initial_seed()) or original(self, requests, *args, **kwargs))
    monkeypatch.chdir(ROOT)
    (tmp_path / "sampled.yaml").write_text((ROOT / "tests/data/lmeval/sp_continue.yaml").read_text()
                                           .replace("task: sp_continue", "task: sampled").replace("do_sample: false", "do_sample: true\n  temperature: 0.8"))
    model = str(tiny_checkpoint("llama", layers=2))
    for extra, seed in (([], 1234), (["--seed", "5"], 5)):
        result = CliRunner().invoke(main, ["eval", model, "--tasks", "sampled", "--include-path", str(tmp_path), "--limit", "2", "--quiet", *extra])
        assert result.exit_code == 0, result.output
        assert seen[-1] == seed
    result = CliRunner().invoke(main, ["eval", model, "--tasks", "boolq", "--data-dir", "tests/data", "--seed", "5", "--quiet"])
    assert result.exit_code == 1 and result.stderr.strip() == ("Error: --seed applies to lm-eval tasks (their sampled generations "
                                                               "and few-shot draws); the built-in tasks draw nothing (their --limit subset is fixed): drop --seed")


def test_a_requests_seed_depends_on_torchs_seed_and_the_request_alone():
    """_request_seeds: a request of a task is named by its task, document, index and repeat, so other
    requests before it or between its repeats change nothing; its repeats, other documents and another
    torch seed give other seeds; a request made by hand (no task) is named by its position."""
    from lm_eval.api.instance import Instance

    from streamprune.evaluate.harness import _request_seeds

    def request(task, doc, idx=0):
        return Instance("generate_until", {}, ("q", {}), idx, metadata=(task, doc, 1))

    a, b, c = request("t", 0), request("t", 1), request("u", 0)
    alone = _request_seeds([a, a, b], 7)
    beside = _request_seeds([c, a, c, a, request("t", 0, idx=1), b], 7)
    assert alone == [beside[1], beside[3], beside[5]]
    assert len(set(beside)) == 6  # c's two repeats, a's, a's other index, b
    assert len(set(alone)) == 3 and _request_seeds([a], 8) != alone[:1]
    assert all(0 <= seed < 2**63 for seed in alone + beside)
    by_hand = [Instance("generate_until", {}, ("q", {}), 0) for _ in range(3)]
    assert len(set(_request_seeds(by_hand, 7))) == 3


SAMPLING_TASK_ARGS = [
    {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "typical_p": 0.95, "epsilon_cutoff": 3e-4,
     "eta_cutoff": 3e-4, "top_h": 0.9, "repetition_penalty": 1.2},
    {"do_sample": True, "temperature": 1.3}, {"temperature": 0.8}, {"do_sample": True, "temperature": 1.0, "top_k": 0},
    {"do_sample": True, "temperature": 0.5, "top_k": None}, {"do_sample": False}, {},
    {"do_sample": True, "temperature": 0.5, "remove_invalid_values": True, "renormalize_logits": True}]


@pytest.mark.parametrize("model_config", [{}, {"do_sample": True, "temperature": 0.6, "top_p": 0.9},  # Llama-3-Instruct's
                                          {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}])  # Qwen2.5's
def test_sampling_warpers_are_hf_generates_in_its_order(tiny_checkpoint, model_config):
    """The processors a task gets are those HF generate makes from what lm-eval's HF backend passes it:
    the task's arguments through lm-eval's normalize_gen_kwargs and HFLM._model_generate (which sets
    the temperature), then GenerationMixin._prepare_generation_config over the model's generation config
    and transformers' defaults (top_k 50), then _get_logits_processor: greedy or sampling alike, the same
    classes in the same order, and the same scores out of the same logits."""
    from types import SimpleNamespace

    from lm_eval.models.utils import normalize_gen_kwargs
    from transformers import AutoTokenizer, GenerationConfig
    from transformers.generation import GenerationMode

    from streamprune.evaluate.harness import _generation_settings

    model_dir = tiny_checkpoint("llama", layers=2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    model.generation_config = GenerationConfig(**model_config)
    ids, scores = torch.tensor([[5, 6, 7, 5]]), torch.randn(1, 256, generator=torch.Generator().manual_seed(0))
    for args in SAMPLING_TASK_ARGS:
        kwargs = normalize_gen_kwargs({"until": [], "max_gen_toks": 8, **args}, 256)
        kwargs.pop("until"), kwargs.pop("max_gen_toks")
        ours, _, sampled = _generation_settings(GenerationConfig(**model_config), "generation_config.json", kwargs)
        passed = {}  # what HFLM hands HF generate
        backend = SimpleNamespace(model=SimpleNamespace(generate=lambda **given: passed.update(given)), device=torch.device("cpu"),
                                  tokenizer=AutoTokenizer.from_pretrained(model_dir), mixed_precision_dtype=None)
        HFLM._model_generate(backend, ids, 12, [], **kwargs)
        settings = {k: v for k, v in passed.items() if k not in ("input_ids", "max_length", "stopping_criteria", "pad_token_id", "use_cache")}
        config, _ = model._prepare_generation_config(None, **settings)
        theirs = model._get_logits_processor(config, input_ids_seq_length=4, device="cpu")
        assert sampled == (config.get_generation_mode() == GenerationMode.SAMPLE), (model_config, args)
        assert [type(p) for p in ours] == [type(p) for p in theirs], (model_config, args)
        assert torch.equal(ours(ids, scores.clone()), theirs(ids, scores.clone())), (model_config, args)


def test_add_bos_token_gives_the_tokenizer_a_bos_as_the_hf_backend_does(tiny_checkpoint):
    """HFLM passes add_bos_token to the tokenizer's from_pretrained: a tokenizer that adds no BOS by
    default then starts every encoding with it, and the scores change with it."""
    model_dir = str(tiny_checkpoint("llama", layers=2))
    streamed = StreamedLM(pretrained=model_dir, device="cpu", batch_size=2, progress=False, add_bos_token="true")
    whole = HFLM(pretrained=model_dir, device="cpu", dtype="float64", batch_size=2, add_bos_token=True)
    bos = streamed.tokenizer.bos_token_id
    assert streamed.tok_encode("hello")[0] == bos and whole.tok_encode("hello") == streamed.tok_encode("hello")
    assert StreamedLM(pretrained=model_dir, device="cpu", progress=False).tok_encode("hello")[0] != bos
    args = [("Ctx one.", " alpha beta"), ("Q?", " y")]
    ours, theirs = (lm.loglikelihood(_requests("loglikelihood", args)) for lm in (streamed, whole))
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=1e-9) and greedy_a == greedy_b
    texts = [("hello world, " * 5,)]
    assert streamed.loglikelihood_rolling(_requests("loglikelihood_rolling", texts)) == pytest.approx(
        whole.loglikelihood_rolling(_requests("loglikelihood_rolling", texts)), rel=1e-9)


def test_a_log_likelihood_that_is_not_finite_stops_the_evaluation(tiny_checkpoint, monkeypatch):
    """HFLM hands a NaN on and lm-eval ranks answers by it; StreamedLM raises NumericalError instead,
    naming the dtype to evaluate in."""
    from streamprune.errors import NumericalError
    from streamprune.evaluate import harness

    model_dir = tiny_checkpoint("llama", layers=2, dtype="float32")
    lm = StreamedLM(pretrained=str(model_dir), device="cpu", progress=False)
    args = [("Ctx one.", " alpha beta"), ("Q?", " y")]
    assert all(math.isfinite(value) for value, _ in lm.loglikelihood(_requests("loglikelihood", args)))
    scores = harness.streamed_logprobs

    def overflowed(*a, **k):
        values = scores(*a, **k)
        values[1] = torch.full_like(values[1], float("nan"))
        return values

    monkeypatch.setattr(harness, "streamed_logprobs", overflowed)
    with pytest.raises(NumericalError, match=re.escape("is not finite: the activations overflowed float32 or the model is "
                                                       "damaged; evaluate with dtype=float64 in --model_args")):
        lm.loglikelihood(_requests("loglikelihood", args))
    # under streamprune eval the advice is that command's option: it has no --model_args
    under_eval = StreamedLM.from_opened(open_model(model_dir, device="cpu"), max_length=16, progress=False)
    with pytest.raises(NumericalError, match=re.escape("damaged; evaluate with --dtype float64") + "$"):
        under_eval.loglikelihood(_requests("loglikelihood", args))
    monkeypatch.setattr(harness, "streamed_logprobs", scores)
    for model, advice in ((lm, "raise max_length in --model_args"),
                          (under_eval, "streamprune eval gives the model 16 tokens (its config's); streamprune-lm-eval takes a "
                                       "larger max_length in --model_args")):
        with pytest.raises(StreamPruneError, match=re.escape(f"does not fit max_length {model.max_length} (the tokens the model "
                                                             f"is given at once); {advice}")):
            model._loglikelihood_tokens([(None, [1], [5] * (model.max_length + 1))])


def test_a_continuation_of_no_tokens_is_refused_and_an_empty_generation_context_starts_from_the_prefix_token(tiny_checkpoint, caplog):
    """An empty continuation would score 0, the likeliest answer of all (HFLM fails on it with a bare
    assertion): refused, saying why.  An empty generation context (HFLM generates from padding alone)
    starts from the prefix token, as lm-eval scores an empty context: the same tokens as transformers'
    greedy generate from that token, with a warning naming the task and document."""
    model_dir = tiny_checkpoint("llama", layers=2)
    lm = StreamedLM(pretrained=str(model_dir), device="cpu", progress=False)
    with pytest.raises(StreamPruneError, match=re.escape("the continuation '' after 'Question: yes or no?' encodes to no tokens: "
                                                         "lm-eval's split of context and continuation gave its tokens to the context")):
        lm.loglikelihood(_requests("loglikelihood", [("Question: yes or no?", " yes"), ("Question: yes or no?", "")]))
    assert lm.tok_encode("") == []  # this tokenizer adds no BOS
    request = _requests("generate_until", [("", {"until": [], "max_gen_toks": 6}), ("Hello", {"until": [], "max_gen_toks": 6})])
    with caplog.at_level("WARNING", logger="streamprune"):
        empty, hello = lm.generate_until(request)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    expected = model.generate(torch.tensor([[lm.prefix_token_id]]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 1:]
    assert empty == lm.tok_decode(expected.tolist()) and empty
    assert "1 generation context(s) encode to no tokens (the first: task None, document None); they start from the " \
           f"prefix token {lm.prefix_token_id} (BOS, else EOS)" in caplog.text
