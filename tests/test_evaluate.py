"""Evaluation: streamed scoring against the whole model, the perplexity protocol, task prompts and metrics."""

import json
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from make_checkpoint import byte_level_tokenizer
from transformers import AutoModelForCausalLM

from streamprune.cli import main
from streamprune.data import WIKITEXT_HELD_OUT
from streamprune.evaluate.loglikelihood import Request, streamed_logprobs, whole_model_logprobs
from streamprune.evaluate.perplexity import load_text, perplexity, slice_ranges
from streamprune.evaluate.tasks import Example, accuracy, encode_pair, get_task, requests_for, subset
from streamprune.loading import open_model

DATA = Path(__file__).parent / "data"


def test_the_work_counted_is_what_block_0_computed_and_what_each_request_takes_alone(tiny_checkpoint):
    """Three answers of 3 tokens after one 40-token context and one request of 33 tokens: read alone they
    take 3 x 42 + 32 = 158 positions (a request's last token is only predicted).  Shared, the context
    runs once and each answer's first 2 tokens after it, the other request alone: 40 + 3 x 2 + 32 = 78
    positions through each block, as few as any exact evaluation could: the requests' distinct prefixes
    number as many.  Read whole, the four rows are padded to 48 (a multiple of 8): 192.  The count stops
    when the `with` block ends."""
    from streamprune.evaluate.work import Work, counting, distinct_prefixes

    stack = open_model(tiny_checkpoint("llama", layers=2), device="cpu").stack
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(10, 250, (40,), generator=generator).tolist()
    requests = [Request(tuple(context + torch.randint(10, 250, (3,), generator=generator).tolist()), 40) for _ in range(3)]
    requests.append(Request(tuple(torch.randint(10, 250, (33,), generator=generator).tolist()), 30))
    assert Work.scored(requests) == Work(4, 0, 158, 78)
    for share, positions in ((True, 78), (False, 192)):
        work = Work()
        with counting(stack, work):
            streamed_logprobs(stack, requests, batch_size=4, share_contexts=share)
        streamed_logprobs(stack, requests[:1], batch_size=4)
        assert work == Work(0, positions, 0)
    assert Work(4, 78, 158, 78).as_dict() == {"requests": 4, "positions": 78, "alone": 158, "least": 78, "ratio": 0.4937}
    assert distinct_prefixes([[1, 2, 3], [1, 2, 4], [5, 6], [1, 2], []]) == 6  # 1, 12, 123, 124, 5, 56
    assert Work(4, 78, 158).describe() == "78 token positions through each block for 4 requests; read one by one they would take 158 (0.49x)"
    assert Work().describe() == "0 token positions through each block for 0 requests" and Work().as_dict()["ratio"] is None


def test_streamed_scores_equal_the_whole_model_with_padding_sharing_and_chunks(tiny_checkpoint):
    model_dir = tiny_checkpoint("qwen3", tie_embeddings=True)  # sliding-window layers too
    generator = torch.Generator().manual_seed(0)
    requests = []
    for length in (5, 9, 9, 17, 30, 41):
        tokens = tuple(torch.randint(0, 256, (length,), generator=generator).tolist())
        requests.append(Request(tokens, start=length - 3))
        requests.append(Request(tokens[:-1] + (7,), start=length - 1))  # same input as the next line
        requests.append(Request(tokens[:-1] + (8,), start=length - 1))
    requests.append(Request(tuple(range(1, 40)), start=1))
    stack = open_model(model_dir, device="cpu").stack
    streamed = streamed_logprobs(stack, requests, batch_size=2, max_resident_tokens=64)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    widths, kept = [], []
    model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    model.lm_head.register_forward_hook(lambda module, args, out: kept.append(out.shape[1]))
    whole = whole_model_logprobs(model, requests, batch_size=3)
    assert len(kept) == len(widths) and all(k <= w for k, w in zip(kept, widths))
    # one-token answers after 29-token contexts: the head runs on the one position scored, not on the
    # 32 (29 padded to a multiple of 8) of each row
    answers = [Request(tuple(torch.randint(0, 256, (30,), generator=generator).tolist()), 29) for _ in range(3)]
    widths.clear()
    kept.clear()
    for a, b in zip(whole_model_logprobs(model, answers, batch_size=3), streamed_logprobs(stack, answers, batch_size=3)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert widths == [32] and kept == [1]
    for request, a, b in zip(requests, streamed, whole):
        with torch.no_grad():  # each request alone, unpadded: logits at positions start - 1 ... predict start ...
            log_probs = model(input_ids=torch.tensor([request.tokens])).logits[0].log_softmax(-1)
        targets = torch.tensor(request.tokens[request.start :])
        expected = log_probs[request.start - 1 : -1].gather(1, targets[:, None]).squeeze(1)
        assert a.shape == (len(request.tokens) - request.start,)
        torch.testing.assert_close(a, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b, expected, rtol=1e-10, atol=1e-10)
    assert not torch.equal(streamed[1], streamed[2])  # same row, different targets


def test_perplexity_protocol_equals_a_hand_computation(tiny_checkpoint):
    model_dir = tiny_checkpoint("llama")
    opened = open_model(model_dir, device="cpu")
    text = WIKITEXT_HELD_OUT.read_text()

    def score(requests):
        return streamed_logprobs(opened.stack, requests, batch_size=3)

    result = perplexity(score, opened.tokenizer, text, seqlen=32, max_windows=5)
    ids = torch.tensor(opened.tokenizer(text)["input_ids"][: 5 * 32]).view(5, 32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[:, :-1].log_softmax(dim=-1)
    nll = -log_probs.gather(-1, ids[:, 1:, None]).mean().item()
    assert result.windows == 5 and result.tokens == 5 * 31
    assert result.value == pytest.approx(math.exp(nll), rel=1e-10)
    sliced = perplexity(score, opened.tokenizer, text, seqlen=32, max_windows=6, slices=3)
    assert len(sliced.slices) == 3 and sliced.windows == 6
    assert sliced.slices_mean == pytest.approx(sum(sliced.slices) / 3)


def test_slices_are_evenly_spaced_runs_of_windows():
    assert slice_ranges(10, 3, None) == [range(0, 3), range(4, 7), range(7, 10)]
    assert slice_ranges(10, 3, 6) == [range(0, 2), range(4, 6), range(8, 10)]
    assert slice_ranges(70, 7, None) == [range(10 * i, 10 * i + 10) for i in range(7)]


def test_encode_pair_follows_the_harness():
    tokenizer = byte_level_tokenizer()
    context, answer = encode_pair(tokenizer, "Question?\nAnswer:", " yes")
    assert tokenizer.decode(context) == "Question?\nAnswer:" and tokenizer.decode(answer) == " yes"
    context, answer = encode_pair(tokenizer, "Answer: ", "no")  # the trailing space moves to the answer
    assert tokenizer.decode(context) == "Answer:" and tokenizer.decode(answer) == " no"
    (request,) = requests_for([Example("x" * 50, ("ab",), 0)], tokenizer, max_length=10)
    assert len(request.tokens) == 11 and request.start == 8  # cut from the left: 8 of the 50 x, " ab"


def test_acc_and_acc_norm_on_hand_made_scores():
    examples = [
        Example("q1", ("a", "bbbb"), gold=1),  # sums -2, -3: acc picks a; per byte -2, -0.75: norm picks bbbb
        Example("q2", ("yes", "no"), gold=0),  # sums -1, -2: both pick yes
    ]
    logprobs = [torch.tensor([-2.0]), torch.tensor([-1.0, -2.0]), torch.tensor([-0.5, -0.5]), torch.tensor([-2.0])]
    assert accuracy(examples, logprobs) == {"acc": 0.5, "acc_norm": 1.0, "n": 2}


def test_the_table_keeps_wide_numbers_apart():
    """Columns are 12 wide, wider where a number needs it: a perplexity of 171436.2823 beside its baseline's
    39599.3886 must not read as one number."""
    from streamprune.evaluate.runner import format_table

    def results(value):
        return {"tasks": {"ll": {"perplexity": value, "primary": "perplexity", "source": "lm-eval", "in_macro_mean": False,
                                 "n": 6, "num_fewshot": 0}, "macro_mean": None}}

    assert format_table(results(171436.28231), results(39599.38862)).splitlines() == [
        "                                  baseline        model    difference",
        "ll perplexity (lm-eval, n=6)    39599.3886  171436.2823  +131836.8937",
    ]
    assert format_table(results(1.5)) == "ll perplexity (lm-eval, n=6)        1.5000"
    assert format_table({"tasks": {"macro_mean": None}}) == "(no metrics)"


def test_task_loaders_read_the_shared_formats():
    boolq = get_task("boolq").load(DATA)
    assert len(boolq) == 60
    assert boolq[0].prompt.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert boolq[0].prompt.startswith("Ethanol fuel -- All biomass")
    assert boolq[0].choices == ("no", "yes") and boolq[0].gold == 0
    hellaswag = get_task("hellaswag").load(DATA)
    assert len(hellaswag) == 60
    assert hellaswag[0].prompt == "Roof shingle removal: A man is sitting on a roof. He"
    assert hellaswag[0].choices[3] == "starts pulling up roofing on a roof." and hellaswag[0].gold == 3
    phishing = get_task("phishing").load(DATA)
    assert phishing[0].prompt == "URL: http://www.crestonwood.com/router.php\nIs this URL legitimate or phishing?\nAnswer:"
    assert phishing[0].choices == ("legitimate", "phishing") and phishing[0].gold == 0
    assert get_task("phishing").describe(phishing) == {"share_phishing": 0.5}


def test_limit_takes_a_fixed_seeded_subset_in_order():
    examples = [Example(str(i), ("a", "b"), 0) for i in range(100)]
    first, second = subset(examples, 10), subset(examples, 10)
    assert first == second and len(first) == 10
    assert [int(e.prompt) for e in first] == sorted(int(e.prompt) for e in first)
    assert subset(examples, None) == examples


def test_eval_command_with_baseline_and_json(tiny_checkpoint, tmp_path):
    dense = tiny_checkpoint("llama")
    pruned = tmp_path / "pruned"
    runner = CliRunner()
    result = runner.invoke(main, ["prune", str(dense), str(pruned), "--calib", str(WIKITEXT_HELD_OUT), "--nsamples", "2",
                                  "--seqlen", "16", "--quiet"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "results.json"
    result = runner.invoke(main, [
        "eval", str(pruned), "--ppl", str(WIKITEXT_HELD_OUT), "--seqlen", "32", "--max-windows", "3",
        "--tasks", "boolq,hellaswag,phishing", "--limit", "5", "--data-dir", str(DATA), "--baseline", str(dense),
        "--json", str(out), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert "baseline" in result.stdout and "difference" in result.stdout and "macro mean accuracy" in result.stdout
    results = json.loads(out.read_text())
    assert results["ppl"]["windows"] == 3 and results["ppl"]["value"] > 1
    assert {"boolq", "hellaswag", "phishing", "macro_mean"} <= set(results["tasks"])
    assert results["tasks"]["boolq"]["n"] == 5 and 0 <= results["tasks"]["hellaswag"]["acc_norm"] <= 1
    primaries = [results["tasks"]["boolq"]["acc"], results["tasks"]["hellaswag"]["acc_norm"], results["tasks"]["phishing"]["acc"]]
    assert results["tasks"]["macro_mean"] == pytest.approx(sum(primaries) / 3)
    assert results["baseline"]["model"] == str(dense)
    assert results["timings"]["total_s"] > 0 and results["options"]["limit"] == 5
    difference, base = results["difference"], results["baseline"]
    assert difference["ppl"]["value"] == results["ppl"]["value"] - base["ppl"]["value"] != 0
    assert set(difference["tasks"]) == {"boolq", "hellaswag", "phishing", "macro_mean"}
    assert set(difference["tasks"]["hellaswag"]) == {"acc", "acc_norm"} and set(difference["tasks"]["boolq"]) == {"acc"}
    for task in ("boolq", "hellaswag", "phishing"):
        for metric, value in difference["tasks"][task].items():
            assert value == results["tasks"][task][metric] - base["tasks"][task][metric]
    assert difference["tasks"]["macro_mean"] == results["tasks"]["macro_mean"] - base["tasks"]["macro_mean"]


def test_differences_are_taken_only_where_both_models_were_measured_alike():
    """eval --baseline's JSON `difference`: model minus baseline, metric by metric (the printed table's last
    column); a task with another number of examples or shots, a perplexity of other windows, a metric
    only one has, and the bookkeeping (n, stderr) are left out."""
    from streamprune.evaluate.runner import differences

    ppl = {"dataset": "w.txt", "windows": 4, "seqlen": 32, "value": 30.0, "slices": [20.0, 40.0], "slices_mean": 30.0}
    model = {"ppl": ppl, "tasks": {
        "boolq": {"acc": 0.75, "n": 4},
        "sp_gen": {"exact_match": 0.5, "exact_match_stderr": 0.2, "n": 2, "num_fewshot": 3, "source": "lm-eval", "primary": "exact_match"},
        "arc": {"acc": 0.5, "n": 2, "source": "lm-eval"},
        "macro_mean": 0.6}}
    baseline = {"ppl": {**ppl, "value": 20.0, "slices": [15.0, 25.0], "slices_mean": 20.0}, "tasks": {
        "boolq": {"acc": 0.5, "n": 4},
        "sp_gen": {"exact_match": 1.0, "exact_match_stderr": 0.0, "n": 2, "num_fewshot": 3, "source": "lm-eval", "primary": "exact_match"},
        "arc": {"acc": 0.25, "n": 3, "source": "lm-eval"},
        "macro_mean": 0.7}}
    assert differences(model, baseline) == {
        "ppl": {"value": 10.0, "slices": [5.0, 15.0], "slices_mean": 10.0},
        "tasks": {"boolq": {"acc": 0.25}, "sp_gen": {"exact_match": -0.5}, "macro_mean": pytest.approx(-0.1)}}
    other_windows = {**baseline, "ppl": {**baseline["ppl"], "windows": 3}}
    assert "ppl" not in differences(model, other_windows)
    assert differences({"tasks": {}}, baseline) == {}


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["--tasks", "no_such_task"], "unknown task 'no_such_task': neither built in"),  # nor lm-eval's, nor close to one
        (["--tasks", "boolq,hellaswg"], "unknown task 'hellaswg' (did you mean 'hellaswag'?): neither built in"),
        (["--tasks", "boolq", "--num-fewshot", "2"], "--num-fewshot applies to lm-eval tasks; the built-in tasks (boolq) are zero-shot;"),
        ([], "nothing to evaluate"),
        (["--ppl", "no-such-text"], "neither a file nor one of"),
        (["--tasks", "boolq", "--data-dir", "/nonexistent"], "missing; check --data-dir"),
        (["--ppl", "wikitext103", "--load-in-8bit", "--load-in-4bit"], "choose one of"),
        (["--ppl", str(WIKITEXT_HELD_OUT), "--load-in-4bit"], "need CUDA"),
    ],
)
def test_eval_errors_are_one_line(tiny_checkpoint, options, fragment):
    if "--load-in-4bit" in options and len(options) == 3 and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(main, ["eval", str(tiny_checkpoint("llama")), "--quiet", *options])
    assert result.exit_code != 0
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("Error: ")
    assert fragment in result.stderr


def test_perplexity_text_from_jsonl_is_its_documents_not_the_json(tmp_path):
    corpus = tmp_path / "c4.jsonl"
    corpus.write_text('{"text": "First document."}\n\n{"text": "Second one", "url": "x"}\n', encoding="utf-8")
    assert load_text(str(corpus)) == "First document. Second one"
    plain = tmp_path / "plain.txt"
    plain.write_text('{"text": "kept as it is"}\n', encoding="utf-8")
    assert load_text(str(plain)) == '{"text": "kept as it is"}\n'


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "opt", "gpt_neox"])
def test_shared_contexts_give_the_whole_models_log_probabilities(tiny_checkpoint, family, monkeypatch):
    """Requests that share a context (multiple-choice endings) run it once per block; every answer's
    log-probabilities equal the whole model's on its own unpadded row, and the unshared path's (float64).
    Contexts of several lengths are left-padded together and exceed Mistral's and Gemma 2's window of 8,
    and so do some endings, right-padded in passes with shorter ones;
    with batch_size 1 every context is a batch of its own, and continuations of contexts of different
    widths share passes (each context left-padded to the widest of its pass)."""
    from streamprune.evaluate import loglikelihood

    mixed_widths = []
    made = loglikelihood._Continuations.__init__

    def spied(self, rows, inputs, stack, contexts):
        made(self, rows, inputs, stack, contexts)
        mixed_widths.append(len({contexts[b].mask.shape[1] for b, _, _ in rows}) > 1)

    monkeypatch.setattr(loglikelihood._Continuations, "__init__", spied)
    model_dir = tiny_checkpoint(family, tie_embeddings=None)
    generator = torch.Generator().manual_seed(3)
    requests = []
    for context_length in (3, 9, 17, 12, 17):
        context = torch.randint(0, 256, (context_length,), generator=generator).tolist()
        for ending_length in (1, 4, 20, 2):  # 20: padded past a window of 8 in a pass with short ones
            ending = torch.randint(0, 256, (ending_length,), generator=generator).tolist()
            requests.append(Request(tuple(context + ending), context_length))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    context = requests[4].tokens[:9]
    with torch.no_grad():  # the model's own greedy ending of a context, and the same ending with one token changed
        greedy_ending = model.generate(torch.tensor([context]), max_new_tokens=3, do_sample=False, pad_token_id=0)[0, 9:].tolist()
    requests += [Request(tuple(context) + tuple(greedy_ending), 9),
                 Request(tuple(context) + tuple(greedy_ending[:2]) + ((greedy_ending[2] + 1) % 256,), 9)]
    stack = open_model(model_dir, device="cpu").stack
    shared_greedy, plain_greedy = [], []
    shared = streamed_logprobs(stack, requests, batch_size=3, max_resident_tokens=80, greedy=shared_greedy)
    plain = streamed_logprobs(stack, requests, batch_size=3, greedy=plain_greedy, share_contexts=False)
    assert not any(mixed_widths)
    mixed_greedy = []
    mixed = streamed_logprobs(stack, requests, batch_size=1, greedy=mixed_greedy)
    assert any(mixed_widths) and mixed_greedy == shared_greedy
    # Gemma 2's eager attention takes its softmax in float32, so rows padded to other lengths (left for
    # contexts batched together, right to a multiple of 8 unshared) differ from one another in the 8th digit
    tol = 1e-6 if family == "gemma2" else 1e-10
    for request, a, b, c in zip(requests, shared, plain, mixed):
        with torch.no_grad():
            log_probs = model(input_ids=torch.tensor([request.tokens])).logits[0].log_softmax(-1)
        targets = torch.tensor(request.tokens[request.start :])
        expected = log_probs[request.start - 1 : -1].gather(1, targets[:, None]).squeeze(1)
        torch.testing.assert_close(a, expected, rtol=tol, atol=tol)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        torch.testing.assert_close(c, expected, rtol=tol, atol=tol)
    assert shared_greedy == plain_greedy and shared_greedy[-2:] == [True, False]


def test_a_start_shared_by_different_contexts_runs_once_where_it_saves_tokens():
    """_sharing_plan on hand-made prompts.  MMLU-like, beside an unrelated prompt: a 35-token header
    before the others, then each of two subjects' 300-token few-shot examples, then 3 questions of 4
    one-token answers: two groups at 335 tokens (one group at the 35 they share would save 175 tokens,
    not 2 x 670; the unrelated prompt makes that choice one level below the top).  One-token answers
    count once: 3 questions of 20 tokens after a 40-token start, 4 answers each, share it (40 each, not
    40 - 3 x 20).  HellaSwag-like: a 33-token label before 60-token contexts of 4 endings: not shared (it
    would run each context's 60 tokens 4 times to save 33).  Two contexts 25 tokens past a 40-token start,
    2 endings each, would save 15 + 15 tokens but pay 40 for the start: not shared.  A start of 31
    tokens (under MIN_SHARED_PREFIX) is not shared; in a run sharing 200 tokens, a context of 4 endings
    100 tokens past them stays on its own (200 - 3 x 100 < 0)."""
    from streamprune.evaluate.loglikelihood import MIN_SHARED_PREFIX, _saves, _sharing_plan

    assert MIN_SHARED_PREFIX == 32
    counter = iter(range(1000, 10**6))

    def fresh(n):  # n tokens seen nowhere else
        return tuple(next(counter) for _ in range(n))

    def shared(plan, requests):
        return sorted((split, sorted(numbers)) for split, numbers in plan if _saves((split, numbers), requests))

    header, subjects, requests = fresh(35), [fresh(300), fresh(300)], []
    for subject in subjects:
        for _ in range(3):
            context = header + subject + fresh(20)
            requests += [Request(context + (answer,), len(context)) for answer in (1, 2, 3, 4)]
    unrelated = (0,) + fresh(50)  # sorts first, sharing nothing with the others
    requests += [Request(unrelated + (answer,), len(unrelated)) for answer in (1, 2)]
    assert shared(_sharing_plan(requests), requests) == [(335, list(range(12))), (335, list(range(12, 24)))]

    start, requests = fresh(40), []
    for _ in range(3):
        context = start + fresh(20)
        requests += [Request(context + (answer,), len(context)) for answer in (1, 2, 3, 4)]
    assert shared(_sharing_plan(requests), requests) == [(40, list(range(12)))]

    start, requests = fresh(40), []
    for _ in range(2):
        context = start + fresh(25)
        requests += [Request(context + fresh(2), len(context)) for _ in range(2)]
    assert shared(_sharing_plan(requests), requests) == [(65, [0, 1]), (65, [2, 3])]

    label, requests = fresh(33), []
    for _ in range(3):
        context = label + fresh(60)
        requests += [Request(context + fresh(10), len(context)) for _ in range(4)]
    assert shared(_sharing_plan(requests), requests) == [(93, list(range(4 * i, 4 * i + 4))) for i in range(3)]

    start, requests = fresh(31), []
    for _ in range(3):
        context = start + fresh(5)
        requests += [Request(context + (answer,), len(context)) for answer in (1, 2)]
    assert shared(_sharing_plan(requests), requests) == []

    start, requests = fresh(200), []
    for _ in range(3):
        context = start + fresh(10)
        requests += [Request(context + (answer,), len(context)) for answer in (1, 2)]
    context = start + fresh(100)
    requests += [Request(context + fresh(8), len(context)) for _ in range(4)]
    plan = _sharing_plan(requests)
    assert sorted(len(numbers) for _, numbers in plan) == [4, 6]  # every request in one group
    assert shared(plan, requests) == [(200, list(range(6))), (300, list(range(6, 10)))]


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "opt", "gpt_neox"])
def test_a_shared_few_shot_prefix_runs_once_and_gives_the_whole_models_log_probabilities(tiny_checkpoint, family, monkeypatch):
    """Few-shot prompts (a 40-token prefix, past Mistral's and Gemma 2's window of 8, then a question of 0
    to 12 tokens) with one-token answers and endings of 1 to 20 tokens: the prefix runs once, in one
    batch of its own, and every answer's log-probabilities equal the whole model's on its own row
    (float64; 1e-6 for Gemma 2, as for shared contexts).  With at most 60 resident tokens the group runs
    in pieces, the prefix once in each, with the same scores."""
    from streamprune.evaluate import loglikelihood

    prefixes = []
    made = loglikelihood._Contexts.__init__

    def spied(self, groups, inputs, stack):
        made(self, groups, inputs, stack)
        prefixes.append([len(group.prefix) for group in groups])

    monkeypatch.setattr(loglikelihood._Contexts, "__init__", spied)
    model_dir = tiny_checkpoint(family)
    generator = torch.Generator().manual_seed(11)

    def tokens(n):
        return tuple(torch.randint(0, 256, (n,), generator=generator).tolist())

    prefix, requests = tokens(40), []
    for question, endings in ((3, (1, 1, 1)), (9, (1, 4, 20)), (0, (1, 2)), (12, (5, 5))):
        context = prefix + tokens(question)
        requests += [Request(context + tokens(n), len(context)) for n in endings]
    stack = open_model(model_dir, device="cpu").stack
    greedy = []
    scores = streamed_logprobs(stack, requests, batch_size=2, greedy=greedy)
    assert prefixes == [[40]]
    prefixes.clear()
    pieces = streamed_logprobs(stack, requests, batch_size=2, max_resident_tokens=60)
    assert len(prefixes) > 1 and all(lengths == [40] for lengths in prefixes)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tol = 1e-6 if family == "gemma2" else 1e-10
    for request, score, piece, hit in zip(requests, scores, pieces, greedy):
        with torch.no_grad():
            log_probs = model(input_ids=torch.tensor([request.tokens])).logits[0].log_softmax(-1)
        targets = torch.tensor(request.tokens[request.start :])
        expected = log_probs[request.start - 1 : -1]
        torch.testing.assert_close(score, expected.gather(1, targets[:, None]).squeeze(1), rtol=tol, atol=tol)
        torch.testing.assert_close(piece, score, rtol=tol, atol=tol)
        assert hit == bool((expected.argmax(-1) == targets).all())


def test_rests_after_a_long_prefix_gather_its_keys_and_values_in_bounded_passes(tiny_checkpoint, monkeypatch):
    """30 questions of 2 tokens after a 200-token prefix, batch_size 1: a pass of rests may gather the
    prefix's keys and values for 203 x 736 / (64 x 3) = 778 positions (the tiny llama's activations per
    token over its key/value entries, times 3 for the concatenated cache and its copy repeated to 2 query
    heads per key/value head), so 3 rows of 200 (10 passes), not the 30 rows that 2-token rests would
    fill; the scores are the unshared path's (float64)."""
    from streamprune.evaluate import loglikelihood

    passes = []
    made = loglikelihood._Continuations.__init__

    def spied(self, rows, inputs, stack, contexts):
        made(self, rows, inputs, stack, contexts)
        passes.append((len(rows), self.width))

    monkeypatch.setattr(loglikelihood._Continuations, "__init__", spied)
    model_dir = tiny_checkpoint("llama", layers=2)
    generator = torch.Generator().manual_seed(2)
    prefix = tuple(torch.randint(0, 256, (200,), generator=generator).tolist())
    requests = [Request(prefix + tuple(torch.randint(0, 256, (3,), generator=generator).tolist()), 202) for _ in range(30)]
    stack = open_model(model_dir, device="cpu").stack
    assert loglikelihood._past_positions(stack, 203) == 778
    shared = streamed_logprobs(stack, requests, batch_size=1)
    assert passes == [(3, 200)] * 10
    for a, b in zip(shared, streamed_logprobs(stack, requests, batch_size=1, share_contexts=False)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_batches_hold_batch_size_rows_of_the_longest_in_tokens_with_little_padding():
    """_fill on hand-made widths, batch_size 2 of the longest (256): 512 tokens a batch.  256 and 240 fit
    (1/32 padding); 224 would make 768 tokens; 224 alone is under MIN_PASS_TOKENS (256), so a 64 joins
    it despite the padding; the other 64s go eight (512 tokens) and six at a time.  Row counts alone
    (2, 2, 2, ...), tokens alone ([224, 64], [64] * 8, [64] * 6 too, but [300, 40] together) or padding
    alone ([224], [64] * 8, [64] * 7) give other batches."""
    from streamprune.evaluate.loglikelihood import MIN_PASS_TOKENS, _fill

    assert MIN_PASS_TOKENS == 256

    def fill(widths, max_tokens):
        return _fill(widths, lambda width: width, max_tokens)

    widths = [256, 240, 224] + [64] * 15
    assert fill(widths, 2 * 256) == [[256, 240], [224, 64], [64] * 8, [64] * 6]
    # continuations come shortest first
    assert fill(sorted(widths), 2 * 256) == [[64] * 8, [64] * 7, [224, 240], [256]]
    assert fill([300, 40], 600) == [[300], [40]]  # 260 of 600 tokens padding, after 300 tokens: split
    assert fill([100, 40], 600) == [[100, 40]]  # the same padding, but 100 tokens would be a slow pass
    assert fill([700, 3], 600) == [[700], [3]]  # wider than the limit: alone


def test_shared_continuations_scored_a_few_positions_at_a_time(tiny_checkpoint, monkeypatch):
    """With the LM head limited to 4 positions a call, the logits come 4 positions at a time, of real
    positions only: the last positions of a batch of 5 contexts as 4 + 1 (not one call of 5 keeping a
    vocabulary row per context), then the continuations' (packed, not rows padded to the longest);
    every score equals the unshared path's (float64), also when the unshared path's calls, packed
    across a batch's rows, split rows and answers between them."""
    from streamprune.evaluate import loglikelihood

    model_dir = tiny_checkpoint("llama", layers=2)
    generator = torch.Generator().manual_seed(5)
    requests = []
    for context_length in (6, 11, 4, 10, 9):
        context = torch.randint(0, 256, (context_length,), generator=generator).tolist()
        for ending_length in (1, 3, 6, 2):
            requests.append(Request(tuple(context + torch.randint(0, 256, (ending_length,), generator=generator).tolist()), context_length))
    stack = open_model(model_dir, device="cpu").stack
    plain = streamed_logprobs(stack, requests, batch_size=3, share_contexts=False)
    calls = []
    monkeypatch.setattr(loglikelihood, "HEAD_LOGITS", 4 * stack.text_config.vocab_size + 3)  # 4 positions a call
    original = stack.decoding

    @contextmanager
    def counted():
        with original() as (inputs, logits_of):
            yield inputs, lambda hidden: calls.append(tuple(hidden.shape[:2])) or logits_of(hidden)

    monkeypatch.setattr(stack, "decoding", counted)
    to_host = []  # what goes to the host: the picked scores, never rows of the vocabulary (0.5 MiB each at 128k)
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda tensor, *a, **k: to_host.append(tensor.numel()) or cpu(tensor, *a, **k))
    shared = loglikelihood.shared_context_logprobs(stack, requests, batch_size=5, greedy=[])  # the 5 contexts in one batch
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    assert to_host and max(to_host) < stack.text_config.vocab_size
    for a, b in zip(shared, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    unshared_calls = []
    head = stack.output_head

    @contextmanager
    def counted_head():
        with head() as logits_of:
            yield lambda packed: unshared_calls.append(packed.shape[0]) or logits_of(packed)

    monkeypatch.setattr(stack, "output_head", counted_head)
    for a, b in zip(streamed_logprobs(stack, requests, batch_size=3, share_contexts=False), plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # every scored position once (5 contexts x (1 + 3 + 6 + 2)), at most 4 a call: the endings of 6 split
    assert sum(unshared_calls) == 60 and max(unshared_calls) == 4
    # the contexts' last positions (5 x 1), then the continuations' real positions (2 + 5 + 1 after
    # each of 5 contexts), packed: 40, four at a time
    assert calls == [(1, 4), (1, 1)] + [(1, 4)] * 10


def test_num_fewshot_zero_agrees_with_the_built_in_tasks_and_more_is_refused_for_them(caplog):
    from streamprune.errors import StreamPruneError
    from streamprune.evaluate.runner import EvalConfig

    assert EvalConfig(tasks=("boolq",), num_fewshot=0).num_fewshot == 0  # they are zero-shot
    with pytest.raises(StreamPruneError, match=r"^--num-fewshot applies to lm-eval tasks; the built-in tasks \(boolq\) are zero-shot"):
        EvalConfig(tasks=("boolq",), num_fewshot=2)
    with pytest.raises(StreamPruneError, match=r"^--include-path applies to lm-eval tasks"):
        EvalConfig(tasks=("boolq",), include_path="tasks")
    with pytest.raises(StreamPruneError, match="--limit must be at least 1"):
        EvalConfig(tasks=("boolq",), limit=0)
    pytest.importorskip("lm_eval")
    with caplog.at_level("WARNING", logger="streamprune"):
        EvalConfig(tasks=("boolq", "sp_boolq"), num_fewshot=2)
        EvalConfig(tasks=("boolq", "sp_boolq"), num_fewshot=2)  # a sweep's next configuration: said once
    assert caplog.text.count("--num-fewshot 2 applies to the lm-eval tasks; the built-in tasks (boolq) stay zero-shot") == 1


@pytest.mark.parametrize("tied", [True, False])
def test_decoding_holds_the_embedding_and_head_once_and_the_placements_reserve_them(tiny_checkpoint, tied, monkeypatch):
    """What decoding keeps resident, the input embedding and the LM head, is one tensor when they are
    tied (not the embedding read and placed a second time for the head), and the placements of shared
    contexts and of generation's caches reserve its bytes beside a block: the reserve they pass grows by
    exactly the embedding's bytes, tied, or the embedding's and head's, untied (counted here from the
    checkpoint's own files)."""
    from safetensors import safe_open

    from streamprune import blocks
    from streamprune.evaluate import loglikelihood
    from streamprune.evaluate.generation import generate

    model_dir = tiny_checkpoint("llama", layers=2, tie_embeddings=tied, vocab=4096)
    stored = {}
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            stored.update({key: f.get_slice(key).get_shape() for key in f.keys()})
    heads = [key for key in stored if key.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert len(heads) == (1 if tied else 2)
    expected = sum(math.prod(stored[key]) for key in heads) * 8  # float64
    stack = open_model(model_dir, device="cpu").stack
    assert stack.resident_outside_bytes() == expected
    with stack.decoding() as (inputs, logits_of):
        hidden, _ = inputs(torch.tensor([[5, 6, 7]]))
        logits_of(hidden)
        embedding, head = stack.model.get_input_embeddings().weight, stack.model.get_output_embeddings().weight
        assert embedding.device.type == head.device.type == "cpu"
        assert (embedding is head) == tied
    assert stack.model.get_output_embeddings().weight.device.type == "meta"

    reserves = []
    placed = blocks.choose_placement
    monkeypatch.setattr(blocks, "choose_placement", lambda nbytes, reserve, *a: reserves.append(reserve) or placed(nbytes, reserve, *a))
    requests = [Request((1, 2, 3, 4, 5, 6), 3), Request((1, 2, 3, 7, 8, 9), 3)]

    def both():
        reserves.clear()
        loglikelihood._sharing_fits(stack, requests, 4, 2**18)
        generate(stack, [[1, 2, 3]], 2)
        return list(reserves)

    counted = both()
    monkeypatch.setattr(stack, "resident_outside_bytes", lambda: 0)
    assert [a - b for a, b in zip(counted, both())] == [expected, expected]
