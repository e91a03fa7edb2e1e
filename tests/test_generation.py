"""Greedy generation streamed block by block (streamprune.evaluate.generation), against transformers'
generate on the same tiny float64 checkpoints, with the key/value caches kept on the device, parked in
files between block visits, and split into rounds."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from streamprune.evaluate import generation
from streamprune.evaluate.generation import generate
from streamprune.loading import open_model
from streamprune.placement import Budget

LENGTHS = (5, 13, 9, 7, 11)


def _contexts(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in LENGTHS]


def _expected(model_dir, contexts, new_tokens):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    # an explicit attention mask: without one, generate would take the context's pad_token_id tokens for padding
    return [model.generate(torch.tensor([c]), attention_mask=torch.ones(1, len(c), dtype=torch.long), max_new_tokens=new_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(c) :].tolist() for c in contexts]


class _Recorded(generation._Parking):
    """_Parking that records its placement, how many tensors it wrote and what it still held at the end."""

    made: list = []

    def __init__(self, placement, device, directory):
        super().__init__(placement, device, directory)
        self.parked = 0
        _Recorded.made.append(self)

    def park(self, name, tensor, *args):
        self.parked += 1
        return super().park(name, tensor, *args)

    def close(self):
        self.left = sorted(self.shapes)
        super().close()


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
def test_groups_decoded_in_the_same_block_visits_equal_transformers_generate(tiny_checkpoint, family):
    """Five rows of different lengths in three groups of two (left-padded each), all in every block
    visit, continue as each does alone in transformers' generate (greedy): Gemma 2's sliding windows and
    softcapping, GPT-NeoX's cache."""
    model_dir = tiny_checkpoint(family, tie_embeddings=None)
    contexts = _contexts()
    ours = generate(open_model(model_dir, device="cpu").stack, contexts, 12, batch_size=2)
    assert ours == _expected(model_dir, contexts, 12)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_caches_parked_in_files_between_visits_give_the_same_tokens(tiny_checkpoint, family, tmp_path, monkeypatch):
    """With --offload disk, and with auto under a host-memory limit too small for the caches, every
    cache entry (and the contexts' hidden states) waits in a file between block visits; the tokens are
    those of transformers' generate, and no file is left behind."""
    model_dir = tiny_checkpoint(family, tie_embeddings=None)
    contexts = _contexts(2)
    expected = _expected(model_dir, contexts, 8)
    monkeypatch.setattr(generation, "_Parking", _Recorded)
    for budget in (Budget(offload="disk", offload_dir=str(tmp_path)), Budget(max_cpu_bytes=1, offload_dir=str(tmp_path))):
        _Recorded.made.clear()
        stack = open_model(model_dir, device="cpu", budget=budget).stack
        assert generate(stack, contexts, 8, batch_size=2) == expected
        (parking,) = _Recorded.made
        assert parking.placement == "disk"
        # 3 groups x 3 blocks x (keys, values) per pass, 8 passes, plus the contexts' hidden states
        assert parking.parked == 3 * 3 * 2 * 8 + 3 * 2
        assert list(tmp_path.iterdir()) == []
        assert parking.left and not [name for name in parking.left if name.endswith("-h")]  # freed once read
        if family == "llama":  # bytes written: each cache once (context and 7 fed tokens), hidden states once
            config = stack.text_config
            head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            groups = [contexts[0:2], contexts[2:4], contexts[4:]]
            caches = sum(len(g) * (max(map(len, g)) + 7) for g in groups) * 3 * 2 * config.num_key_value_heads * head * 8
            hidden = sum(len(g) * max(map(len, g)) for g in groups) * 2 * config.hidden_size * 8
            assert parking.bytes_written == caches + hidden
    _Recorded.made.clear()
    assert generate(open_model(model_dir, device="cpu").stack, contexts, 8, batch_size=2) == expected
    assert _Recorded.made == []  # room on the device: nothing parked
    # host copies (what a GPU parks in host memory; on a CPU placement.choose_placement never picks it)
    stack = open_model(model_dir, device="cpu").stack
    monkeypatch.setattr(stack, "placement_of_bytes", lambda *args: "cpu")
    assert generate(stack, contexts, 8, batch_size=2) == expected
    (parking,) = _Recorded.made
    assert parking.placement == "cpu" and parking.parked == 3 * 3 * 2 * 8 + 3 * 2
    if family == "llama":
        assert parking.bytes_written == caches + hidden


def test_rounds_and_rows_that_stop_early(tiny_checkpoint, tmp_path, capsys):
    """Rounds of at most max_resident_tokens tokens give the same tokens as one round; a row that meets a
    stop id stops there (the id included) while the rows of its group and of the others go on.  When
    every row has stopped, the bar ends full (a log's last line is not 'Generating: 1/10')."""
    model_dir = tiny_checkpoint("llama", layers=2)
    stack = open_model(model_dir, device="cpu").stack
    contexts = _contexts(3)
    free = generate(stack, contexts, 10, batch_size=2)
    assert free == _expected(model_dir, contexts, 10)
    assert generate(stack, contexts, 10, batch_size=2, max_resident_tokens=30) == free  # a group a round
    stop = free[0][0]
    stopped = generate(stack, contexts, 10, stop_ids={stop}, batch_size=2)
    for row, tokens in zip(free, stopped):
        assert tokens == (row[: row.index(stop) + 1] if stop in row else row)
    assert stopped[0] == [stop] and any(len(tokens) == 10 for tokens in stopped)
    # the same with every cache in files, and with row 0 alone in its group: a whole group stops early
    parked = open_model(model_dir, device="cpu", budget=Budget(offload="disk", offload_dir=str(tmp_path))).stack
    assert generate(parked, contexts, 10, stop_ids={stop}, batch_size=2) == stopped
    _Recorded.made.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "_Parking", _Recorded)
        assert generate(parked, contexts[:1] + contexts, 10, stop_ids={stop}, batch_size=1) == [[stop]] + stopped
    # groups 0 and 1 (row 0 twice) stopped at their first token: nothing of theirs was held to the end
    left = _Recorded.made[0].left
    assert left and not [name for name in left if name.split("-")[0] in ("0", "1")]
    assert generate(stack, contexts, 0) == [[]] * len(contexts)
    capsys.readouterr()
    assert generate(stack, contexts[:1], 10, stop_ids={stop}, progress=True) == [[stop]]
    assert capsys.readouterr().err.splitlines()[-1].startswith("Generating: 10/10 token")


def _shared_start_contexts():
    """Five contexts after the same 40 tokens (rests of 6, 3, 9 and 1 tokens, the 3-token one twice) and
    one of 7 tokens that begins otherwise, mixed; and one more after the start, 50 tokens past it."""
    generator = torch.Generator().manual_seed(4)
    start = torch.randint(10, 256, (40,), generator=generator).tolist()
    rests = [[first] + torch.randint(0, 256, (n - 1,), generator=generator).tolist() for first, n in zip((1, 2, 3, 4, 6), (6, 3, 9, 1, 50))]
    other = [5] + torch.randint(0, 256, (6,), generator=generator).tolist()
    return [start + rests[0], other, start + rests[1], start + rests[2], start + rests[3], start + rests[1]], start + rests[4]


def _expected_with_logits(model_dir, contexts, new_tokens):
    """transformers' generate (greedy, float64) on each context alone: its new tokens, and {the ids so
    far: the float32 logits of the next token}, as HF generate hands them to its logits processors."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tokens, logits = [], {}
    for c in contexts:
        out = model.generate(torch.tensor([c]), attention_mask=torch.ones(1, len(c), dtype=torch.long), max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        tokens.append(out.sequences[0, len(c) :].tolist())
        for step, scores in enumerate(out.logits):
            logits[tuple(c + tokens[-1][:step])] = scores[0]
    return tokens, logits


class _Logits:
    """A logits processor that changes nothing and records each row's logits by the ids before them."""

    def __init__(self):
        self.seen = {}

    def __call__(self, ids, scores):
        self.seen[tuple(ids[0].tolist())] = scores[0].clone()
        return scores


def _tokens_through_block_0(stack, monkeypatch) -> list:
    """Records the tokens (rows x columns) of every call of block 0."""
    seen, load = [], stack.load_block

    def loaded(index, *args, **kwargs):
        block = load(index, *args, **kwargs)
        if index:
            return block

        def call(hidden, **arguments):
            seen.append(hidden.shape[0] * hidden.shape[1])
            return block(hidden, **arguments)
        return call

    monkeypatch.setattr(stack, "load_block", loaded)
    return seen


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen2", "gpt_neox", "opt"])
def test_a_start_shared_by_contexts_is_read_once_and_the_tokens_are_transformers(tiny_checkpoint, family, tmp_path, monkeypatch):
    """Contexts that begin with the same 40 tokens read them once: sorted longest first (49, 46 | 43, 43
    | 41 tokens, two rows a group) each group reads its columns from 40 on, the start runs alone, the
    other context as before: 40 + 2 x 9 + 2 x 3 + 1 + 7 = 72 tokens through block 0 in the first pass,
    not 276.  Every row's tokens, and the logits of each, are those of transformers' generate on it
    alone: Mistral's, Gemma 2's and Qwen2's windows of 8 (a row padded by 3 needs start positions its
    window has passed in the start's own batch), GPT-NeoX's and OPT's positions; with the caches in
    files and in host memory, in rounds of one group (the start read in each), with a row padded past
    the whole start, and with rows stopping early."""
    model_dir = tiny_checkpoint(family, tie_embeddings=None)
    contexts, longer = _shared_start_contexts()
    expected, logits = _expected_with_logits(model_dir, contexts + [longer], 8)
    stack = open_model(model_dir, device="cpu").stack
    seen = _tokens_through_block_0(stack, monkeypatch)
    generate(stack, contexts, 1, batch_size=2)
    assert sum(seen) == 40 + 2 * 9 + 2 * 3 + 1 + 7
    seen.clear()
    generate(stack, contexts, 1, batch_size=2, share_contexts=False)
    assert sum(seen) == 2 * 46 + 2 * 49 + 2 * 43
    recorded = _Logits()
    assert generate(stack, contexts + [longer], 8, batch_size=2, processor=recorded) == expected  # 90, 49 | 46, 43 | 43, 41
    assert recorded.seen.keys() == logits.keys()
    for ids, scores in logits.items():
        torch.testing.assert_close(recorded.seen[ids], scores, rtol=0, atol=1e-5)
    expected = expected[:-1]
    assert generate(stack, contexts, 8, batch_size=2, max_resident_tokens=30) == expected  # a group a round
    assert generate(stack, contexts, 8, batch_size=3) == expected  # 49, 46, 43 | 43, 41
    stop = expected[0][1]
    assert generate(stack, contexts, 8, batch_size=2, stop_ids={stop}) == [row[: row.index(stop) + 1] if stop in row else row
                                                                                 for row in expected]
    # the caches in files, the starts on the device
    parked = open_model(model_dir, device="cpu", budget=Budget(offload="disk", offload_dir=str(tmp_path))).stack
    monkeypatch.setattr(generation, "_Parking", _Recorded)
    if family == "llama":  # left to itself, --offload disk puts nothing on the device: the prompts are read whole
        seen = _tokens_through_block_0(parked, monkeypatch)
        assert generate(parked, contexts, 8, batch_size=2) == expected
        assert seen[:3] == [2 * 46, 2 * 49, 2 * 43]
    monkeypatch.setattr(generation, "_starts_fit", lambda *args: True)
    _Recorded.made.clear()
    assert generate(parked, contexts, 8, batch_size=2) == expected
    if family == "llama":  # the groups' own columns are parked, not the start's: 2 x (9 + 7) + 2 x (3 + 7) + (1 + 7) + (7 + 7)
        config = stack.text_config
        per_token = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 8
        own = 2 * 9 + 2 * 3 + 1 + 7  # read in the first pass, whose hidden states wait after blocks 0 and 1
        assert _Recorded.made[0].bytes_written == per_token * 3 * (own + 7 * 6) + 2 * own * config.hidden_size * 8
    monkeypatch.setattr(stack, "placement_of_bytes", lambda *args: "cpu")  # host copies, as a GPU parks them
    _Recorded.made.clear()
    assert generate(stack, contexts, 8, batch_size=2) == expected
    assert _Recorded.made[0].placement == "cpu"


def test_the_work_counted_for_generation_is_block_0s_positions_against_each_row_alone(tiny_checkpoint):
    """The contexts of the test above (46, 7, 43, 49, 41 and 43 tokens: 229), each alone, read their
    tokens and then each new token but the last: 229 with one new token, 229 + 6 x 7 = 271 with eight.
    At the least, each distinct prefix once: 40 + 6 + 3 + 9 + 1 + 7 = 66 (the twice-given context
    once), and 66 + 5 x 7 with eight (its two rows' tokens alike).  Through block 0: 72 in the first
    pass with the start shared, 276 read whole (groups of two padded to 46, 49 and 43), then one
    position a row for each later token (42)."""
    from streamprune.evaluate.work import Work, counting

    stack = open_model(tiny_checkpoint("llama", tie_embeddings=None), device="cpu").stack
    contexts, _ = _shared_start_contexts()
    for share, first in ((True, 72), (False, 276)):
        for new_tokens, later in ((1, 0), (8, 42)):
            work = Work()
            with counting(stack, work):
                new = generate(stack, contexts, new_tokens, batch_size=2, share_contexts=share)
            assert work.positions == first + later
            assert Work.generated(contexts, new) == Work(6, 0, 229 + later, 66 + 5 * later // 6)
    work = Work()
    with counting(stack, work):  # no new token asked for: nothing runs, and nothing would alone
        new = generate(stack, contexts, 0)
    assert work.positions == 0 and Work.generated(contexts, new) == Work(6, 0, 0, 0)


def test_sliding_windows_that_cannot_keep_every_position_share_nothing(tiny_checkpoint, monkeypatch):
    """Without transformers' activate_past_recording a sliding-window layer of the start's batch would
    drop positions that a row padded more still needs: the contexts are read whole, and the tokens
    are still transformers'."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    model_dir = tiny_checkpoint("gemma2", tie_embeddings=None)
    contexts, _ = _shared_start_contexts()
    stack = open_model(model_dir, device="cpu").stack
    monkeypatch.delattr(DynamicSlidingWindowLayer, "activate_past_recording")
    seen = _tokens_through_block_0(stack, monkeypatch)
    assert generate(stack, contexts, 8, batch_size=2) == _expected(model_dir, contexts, 8)
    assert seen[:3] == [2 * 46, 2 * 49, 2 * 43]  # the first pass: the callers' groups, whole


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_parked_bytes_bound_the_caches_of_a_round(tiny_checkpoint, family):
    """The bytes a round may park: for Llama exactly a token's keys and values (2 x kv heads x head size
    x 8 bytes) for every block and every padded context and new token, plus the contexts' hidden states;
    never less than the caches transformers' generate builds for the same groups, also for Gemma 2,
    whose block 0 keeps a sliding window of 8 (shorter than the contexts)."""
    model_dir = tiny_checkpoint(family, tie_embeddings=None)
    stack = open_model(model_dir, device="cpu").stack
    contexts = _contexts()
    groups, new = [contexts[0:2], contexts[2:4]], 6  # widths 13 and 9
    with stack.decoding() as (inputs, _):
        group = generation._Group(0, groups[0], inputs, stack.device, new)
        group.run(stack.load_block(0), 0, None)
        stack.free_block(0)
        estimate = generation._parked_bytes(stack, group, groups, new)
    config = stack.text_config
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_key_value_heads * head * 8
    padded = 2 * 13 + 2 * 9
    hidden = 8 * config.hidden_size * padded
    assert estimate == per_token * stack.num_blocks * (padded + new * 4) + hidden
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    built = 0
    for rows in groups:
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(c)) + c for c in rows])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in rows])
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0, return_dict_in_generate=True)
        built += sum(layer.keys.nbytes + layer.values.nbytes for layer in out.past_key_values.layers)
    if family == "llama":  # every token but the last generated one is in the cache
        assert built == per_token * stack.num_blocks * (padded + (new - 1) * 4)
    assert built <= estimate - hidden


class _FailingTokenizer:
    """Decodes as a list's repr, and fails on its third call."""

    calls = 0

    def decode(self, ids):
        _FailingTokenizer.calls += 1
        if _FailingTokenizer.calls == 3:
            raise KeyboardInterrupt
        return repr(ids)


def test_parked_files_are_removed_when_decoding_stops_with_an_error(tiny_checkpoint, tmp_path):
    """Ctrl-C (or any error) in the middle of decoding leaves no cache file behind."""
    model_dir = tiny_checkpoint("llama", layers=2)
    stack = open_model(model_dir, device="cpu", budget=Budget(offload="disk", offload_dir=str(tmp_path))).stack
    with pytest.raises(KeyboardInterrupt):
        generate(stack, _contexts(), 8, _FailingTokenizer(), until=["never"], batch_size=2)
    assert _FailingTokenizer.calls == 3
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("placement", ["cpu", "disk"])
def test_a_cache_that_grew_is_parked_by_writing_its_new_positions_only(placement, tmp_path):
    """_Parking stores positions first, so a cache that only appended since its last visit is parked by
    writing its new positions: the first ones stay as parked before (here, deliberately, the tensor's own
    first positions are changed and must not be written), the others are the tensor's. Without
    `appends` (a sliding-window layer) the whole tensor is written again."""
    parking = generation._Parking(placement, torch.device("cpu"), str(tmp_path))
    try:
        first = torch.arange(2 * 3 * 5 * 4, dtype=torch.float64).view(2, 3, 5, 4)
        parked = parking.park("0-0k", first, True, 9)
        assert parked.device.type == "meta" and parked.shape == first.shape
        assert torch.equal(parking.fetch("0-0k", parked), first)
        grown = -torch.arange(2 * 3 * 7 * 4, dtype=torch.float64).view(2, 3, 7, 4)
        parked = parking.park("0-0k", grown, True, 9)
        back = parking.fetch("0-0k", parked)
        assert back.shape == (2, 3, 7, 4)
        assert torch.equal(back[:, :, :5], first) and torch.equal(back[:, :, 5:], grown[:, :, 5:])
        if placement == "disk":  # positions x rows x heads x size x 8 bytes, nothing more
            assert (parking.folder / "0-0k").stat().st_size == 7 * 2 * 3 * 4 * 8
        window = grown[:, :, 3:] + 0.5  # dropped its oldest positions: written whole
        assert torch.equal(parking.fetch("0-0k", parking.park("0-0k", window, False, 9)), window)
        longer = torch.cat([window, torch.rand(2, 3, 8, 4, dtype=torch.float64)], dim=2)  # past the capacity
        assert torch.equal(parking.fetch("0-0k", parking.park("0-0k", longer, True, 9)), longer)
        hidden = torch.randn(2, 6, 8, dtype=torch.float64)  # (rows, positions, hidden), parked whole
        assert torch.equal(parking.fetch("0-h", parking.park("0-h", hidden)), hidden)
    finally:
        parking.close()


def _sampled(model_dir, contexts, new_tokens, seeds, eos_token_id=None, **settings):
    """transformers' generate(do_sample=True) on each context alone (float64) after torch.manual_seed of
    its seed: its new tokens (up to eos_token_id, included, if given)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = []
    for context, seed in zip(contexts, seeds):
        torch.manual_seed(seed)
        out.append(model.generate(torch.tensor([context]), attention_mask=torch.ones(1, len(context), dtype=torch.long),
                                  max_new_tokens=new_tokens, do_sample=True, eos_token_id=eos_token_id, pad_token_id=0,
                                  **settings)[0, len(context) :].tolist())
    return out


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sampled_rows_draw_what_transformers_generate_draws_for_each_alone(tiny_checkpoint, family, tmp_path):
    """With a seed per context, each row is sampled with its own generator: its tokens are those HF
    generate(do_sample=True) samples for that context alone after torch.manual_seed(seed), with HF's
    warpers (temperature, top_k, top_p), whatever the grouping (batch_size), the rounds, the caches
    parked in files, or a shared start.  The draws are not greedy ones; other seeds, or the warpers
    less top_k, draw other tokens."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    model_dir = tiny_checkpoint(family, tie_embeddings=None)
    (start_contexts, _) = _shared_start_contexts()
    contexts = _contexts(5) + start_contexts[:3]
    seeds = [11 * n + 3 for n in range(len(contexts))]
    warpers = LogitsProcessorList([TemperatureLogitsWarper(1.5), TopKLogitsWarper(40), TopPLogitsWarper(0.95)])
    expected = _sampled(model_dir, contexts, 8, seeds, temperature=1.5, top_k=40, top_p=0.95)
    stack = open_model(model_dir, device="cpu").stack
    assert generate(stack, contexts, 8, batch_size=2, processor=warpers, seeds=seeds) == expected
    assert generate(stack, contexts, 8, batch_size=3, processor=warpers, seeds=seeds, max_resident_tokens=30,
                    share_contexts=False) == expected
    parked = open_model(model_dir, device="cpu", budget=Budget(offload="disk", offload_dir=str(tmp_path))).stack
    assert generate(parked, contexts, 8, batch_size=2, processor=warpers, seeds=seeds) == expected
    # a row that draws a stop id stops there while the others of its group go on drawing their own
    stop = expected[1][2]
    stopped = _sampled(model_dir, contexts, 8, seeds, eos_token_id=stop, temperature=1.5, top_k=40, top_p=0.95)
    assert generate(stack, contexts, 8, batch_size=2, processor=warpers, seeds=seeds, stop_ids={stop}) == stopped
    assert len(stopped[1]) == 3 and any(len(row) == 8 for row in stopped)
    assert expected != generate(stack, contexts, 8, batch_size=2)
    assert expected != generate(stack, contexts, 8, batch_size=2, processor=warpers, seeds=[seed + 1 for seed in seeds])
    # the warpers are applied: without top_k the same seeds draw other tokens
    assert expected != generate(stack, contexts, 8, batch_size=2, processor=LogitsProcessorList(warpers[::2]), seeds=seeds)
    with pytest.raises(ValueError, match="2 seeds for 8 contexts"):
        generate(stack, contexts, 8, seeds=seeds[:2])


def test_a_context_given_several_times_is_read_once_and_each_copy_draws_its_own(tiny_checkpoint, monkeypatch):
    """lm-eval's repeats of a sampled task: two 50-token contexts that begin with the same 34 tokens,
    each given four times.  Sharing the 34 would read 34 + 8 x 16 = 162 tokens through block 0 in the
    first pass; each context's copies sharing all of it but the last token read 2 x 49 + 8 = 106 (the
    copies counted as rows, not as one context), not 400.  Each copy samples with its own seed what
    transformers' generate samples for it alone."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    model_dir = tiny_checkpoint("llama", tie_embeddings=None)
    generator = torch.Generator().manual_seed(6)
    start = torch.randint(10, 256, (34,), generator=generator).tolist()
    a, b = (start + [first] + torch.randint(0, 256, (15,), generator=generator).tolist() for first in (1, 2))
    contexts, seeds = [a] * 4 + [b] * 4, list(range(100, 108))
    stack = open_model(model_dir, device="cpu").stack
    seen = _tokens_through_block_0(stack, monkeypatch)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(1.2)])
    ours = generate(stack, contexts, 6, batch_size=4, processor=warpers, seeds=seeds)
    assert seen[:3] == [2 * 49, 4, 4] and len(set(map(tuple, ours))) > 2
    assert ours == _sampled(model_dir, contexts, 6, seeds, temperature=1.2, top_k=0)
