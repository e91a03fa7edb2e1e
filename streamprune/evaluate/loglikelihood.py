"""Log-probabilities of tokens given the tokens before them, one block resident at a time.

A Request is a row of token ids and the index of its first scored token: the result is
log p(tokens[j] | tokens[:j]) for every j >= start.  Perplexity scores whole windows from token 1;
a multiple-choice question scores the tokens of each answer after its prompt.

Requests that feed the model the same tokens (the answers " yes" and " no" after the same prompt)
share one row; requests that share a prompt, or a long start of their prompts (the same few-shot
examples before each question), run it once per block (shared_context_logprobs).  Rows are sorted by
length and batched; a batch is right-padded, which a causal model never looks at from a real token, so
no attention mask is needed.  Batches are kept resident in rounds
of at most `max_resident_tokens` padded tokens: each round streams through every block once, and where
its hidden states live (device, host memory or disk) is chosen for the whole round against the memory
limits, since all of them are resident at once.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from .. import progress as progress_bars
from ..blocks import DecoderStack, kv_cache, left_padded, return_freed_memory
from ..walker import BlockWalker

PAD_TO_MULTIPLE = 8
HEAD_LOGITS = 2**23  # logits per LM-head call (32 MiB in float32, as much again for their log-softmax)
MIN_PASS_TOKENS = 256  # below this a pass's matrix products lose more speed than padding costs (_fill)
# A start of prompts (a prefix) shorter than this is not shared between different prompts: a template's
# first words save little, and the prompts' other tokens then run in the continuations' passes.
MIN_SHARED_PREFIX = 32


def head_positions(vocab_size: int) -> int:
    """Positions per LM-head call: HEAD_LOGITS over the vocabulary (170 for SmolLM2's 49152, 65 for
    Llama 3's 128256), which bounds the logits' memory whatever the vocabulary."""
    return max(1, HEAD_LOGITS // vocab_size)


@dataclass(frozen=True)
class Request:
    tokens: tuple[int, ...]
    start: int  # first scored position, >= 1

    def __post_init__(self):
        if not 1 <= self.start < len(self.tokens):
            raise ValueError(f"start {self.start} must be in [1, {len(self.tokens)})")

    @property
    def scored(self) -> int:
        """How many tokens are scored (the continuation's length)."""
        return len(self.tokens) - self.start


@dataclass
class _Row:
    """One distinct model input and the requests that read their scores from it."""

    tokens: tuple[int, ...]
    requests: list[int]
    first_position: int  # earliest position whose next-token distribution is needed


def _rows(requests: list[Request]) -> list[_Row]:
    by_input: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for number, request in enumerate(requests):
        by_input[request.tokens[:-1]].append(number)
    return [
        _Row(tokens, numbers, min(requests[n].start for n in numbers) - 1) for tokens, numbers in by_input.items()
    ]


def _batches(rows: list[_Row], batch_size: int, max_resident_tokens: int) -> list[list[list[_Row]]]:
    """Rows sorted by length (longest first) in batches of equal size in tokens: batch_size rows of the
    longest, more of shorter ones (_fill); the batches in chunks of at most max_resident_tokens padded tokens."""
    ordered = sorted(rows, key=lambda row: len(row.tokens), reverse=True)
    batches = _fill(ordered, lambda row: _padded_length([row]), batch_size * _padded_length(ordered[:1])) if ordered else []
    return chunked(batches, lambda batch: len(batch) * _padded_length(batch), max_resident_tokens)


def chunked(items: list, size, limit: int) -> list[list]:
    """Consecutive items in chunks whose sizes (size(item), e.g. tokens) add up to at most `limit`, one
    item at least: the rounds whose hidden states or caches are resident together."""
    chunks, chunk, total = [], [], 0
    for item in items:
        if chunk and total + size(item) > limit:
            chunks.append(chunk)
            chunk, total = [], 0
        chunk.append(item)
        total += size(item)
    if chunk:
        chunks.append(chunk)
    return chunks


def _fill(items: list, width, max_tokens: int) -> list[list]:
    """Items sorted by width in consecutive batches of at most max_tokens padded tokens (rows times the
    widest row), one item at least, with at most 1/8 of a batch's tokens padding once it holds
    MIN_PASS_TOKENS.

    A forward pass's memory grows with its tokens (the MLP's activations) and with rows times width
    squared (attention scores); with batch_size rows of the longest as the limit, a batch of shorter
    rows holds no more of either, while its matrix products stay as large as the first batch's rather
    than a few short rows' (two to three times slower per token on a CPU below 64 rows, more on a GPU).
    A padded position costs what a real token does, hence the bound on padding; but a pass of fewer
    than MIN_PASS_TOKENS tokens is slower per token by more than the padding it saves (measured on a
    2-core CPU, float32, SmolLM2's linears: 109 GFLOPS below 64 rows, 158 below 128, 187 from 192)."""
    batches, current, total, widest = [], [], 0, 0
    for item in items:
        size = width(item)
        wide, rows = max(widest, size), len(current) + 1
        padding = 8 * (total + size) < 7 * rows * wide and len(current) * widest >= MIN_PASS_TOKENS
        if current and (rows * wide > max_tokens or padding):
            batches.append(current)
            current, total, wide = [], 0, size
        current.append(item)
        total, widest = total + size, wide
    if current:
        batches.append(current)
    return batches


def _padded_length(batch: list[_Row]) -> int:
    longest = max(len(row.tokens) for row in batch)
    return -(-longest // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE


def _padded_ids(batch: list[_Row]) -> torch.Tensor:
    ids = torch.zeros((len(batch), _padded_length(batch)), dtype=torch.long)
    for i, row in enumerate(batch):
        ids[i, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
    return ids


def _score_rows(hidden: torch.Tensor, batch: list[_Row], requests: list[Request], logits_of, positions: int,
                results: list, greedy: list | None = None, first_kept: int = 0) -> None:
    """Fills results[n] for every request n read from the batch's rows; hidden is (rows, padded length,
    hidden_size). The positions whose next-token distributions are needed, of all rows, are packed
    (_packed_scores): one LM-head call for a batch of answers of a token each, not one a row (a
    matrix-vector product, memory-bound). With `greedy`, greedy[n] is whether every scored token is the
    most likely one (the harness's is_greedy: argmax of the logits, first index on ties, as torch.argmax).
    `first_kept`: the position of hidden[:, 0] in the rows (when the positions before it were left out)."""
    spans, wanted, numbers, offset = [], [], [], 0
    for i, row in enumerate(batch):
        spans.append(hidden[i, row.first_position - first_kept : len(row.tokens) - first_kept])
        for n in row.requests:
            request = requests[n]  # positions start - 1 ... predict tokens start ...
            wanted.append((offset + request.start - 1 - row.first_position, request.tokens[request.start :]))
            numbers.append(n)
        offset += len(row.tokens) - row.first_position
    for n, (picked, hits) in zip(numbers, _packed_scores(torch.cat(spans), wanted, logits_of, positions, greedy is not None)):
        results[n] = picked
        if greedy is not None:
            greedy[n] = bool(hits.all())


def _packed_scores(packed: torch.Tensor, wanted: list, logits_of, positions: int, greedy: bool) -> list[tuple]:
    """Per answer of `wanted` (its first position in `packed`, its target tokens), the float64
    log-probabilities of its targets at its positions of `packed` (positions, hidden_size), and with
    `greedy` whether each is the argmax (first index on ties, as torch.argmax; else None). The logits come
    `positions` at a time, so a call may hold the ends and starts of several answers. The picking is done
    where the logits are: only the picked values and flags go to the host, not rows of the vocabulary
    (on a GPU, 0.5 MiB a position for a 128k vocabulary)."""
    scores = [(torch.empty(len(targets), dtype=torch.float64), torch.empty(len(targets), dtype=torch.bool) if greedy else None)
              for _, targets in wanted]
    for a in range(0, len(packed), positions):
        b = min(a + positions, len(packed))
        log_probs = _log_probs(logits_of(packed[a:b]))
        spans, rows, targets = [], [], []  # (answer, its first and last + 1 target here), and the positions picked
        for number, (first, answer_targets) in enumerate(wanted):
            lo, hi = max(a, first), min(b, first + len(answer_targets))
            if lo < hi:
                spans.append((number, lo - first, hi - first))
                rows.extend(range(lo - a, hi - a))
                targets.extend(answer_targets[lo - first : hi - first])
        if not spans:
            continue
        rows_at = torch.tensor(rows, device=log_probs.device)
        targets_at = torch.tensor(targets, device=log_probs.device)
        picked_all = log_probs[rows_at, targets_at].double().cpu()
        hits_all = (log_probs.argmax(dim=-1)[rows_at] == targets_at).cpu() if greedy else None
        done = 0
        for number, lo, hi in spans:
            picked, hits = scores[number]
            picked[lo:hi] = picked_all[done : done + hi - lo]
            if greedy:
                hits[lo:hi] = hits_all[done : done + hi - lo]
            done += hi - lo
    return scores


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the vocabulary, in float32 at least, where the logits are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=-1)


@torch.inference_mode()
def streamed_logprobs(
    stack: DecoderStack,
    requests: list[Request],
    batch_size: int = 4,
    max_resident_tokens: int = 2**18,
    progress: bool = False,
    desc: str = "Scoring",
    greedy: list | None = None,
    share_contexts: bool = True,
) -> list[torch.Tensor]:
    """Per request, the float64 log-probabilities of tokens[start:], with one block resident at a time.
    A list passed as `greedy` receives, per request, whether every scored token was the argmax (one bool).

    With share_contexts, requests that share a prefix run it once per block, and the rest of each
    request attends to its keys and values (shared_context_logprobs): the context of the endings of a
    HellaSwag question, or the few-shot examples before every question of an MMLU subject
    (_sharing_plan says which, where it saves work).
    """
    if greedy is not None:
        greedy[:] = [None] * len(requests)
    results: list = [None] * len(requests)
    groups = [group for group in _sharing_plan(requests) if _saves(group, requests)] if share_contexts else []
    shared = [n for _, numbers in groups for n in numbers]
    if shared and not _sharing_fits(stack, [requests[n] for n in shared], batch_size, max_resident_tokens):
        shared = []
    if shared:  # those requests one way, the others the other, each result where it belongs
        rest = sorted(set(range(len(requests))) - set(shared))
        numbered = iter(range(len(shared)))  # the groups in the numbers of the shared requests' own list
        plan = [(split, [next(numbered) for _ in numbers]) for split, numbers in groups]
        for numbers, score, what in ((shared, partial(shared_context_logprobs, plan=plan), "shared contexts"),
                                     (rest, partial(streamed_logprobs, share_contexts=False), "other requests")):
            flags = [] if greedy is not None else None  # argmax only where asked for
            named = f"{desc} ({what})" if rest else desc  # two passes over the blocks: the bars say which is which
            try:
                scores = score(stack, [requests[n] for n in numbers], batch_size, max_resident_tokens, progress, named, flags) if numbers else []
            except _NoCache:  # a decoder that builds no key/value cache: every request unshared
                return streamed_logprobs(stack, requests, batch_size, max_resident_tokens, progress, desc, greedy, share_contexts=False)
            for i, (n, result) in enumerate(zip(numbers, scores)):
                results[n] = result
                if greedy is not None:
                    greedy[n] = flags[i]
        return results
    chunks = _batches(_rows(requests), batch_size, max_resident_tokens)
    steps = len(chunks) * (stack.num_blocks + 1)
    with progress_bars.bar(total=steps, desc=desc, unit="block", enabled=progress, leave=False) as bar, \
            BlockWalker(stack, read_ahead=stack.device.type == "cuda") as walker:
        for chunk in chunks:
            resident = sum(len(batch) * _padded_length(batch) for batch in chunk) * stack.text_config.hidden_size
            placement = stack.placement_for(resident, batch_size * max(_padded_length(batch) for batch in chunk))
            # pinned or not, the chunk's batches together (each is its own tensor, rounded up on its own)
            itemsize, hidden_size = stack.dtype.itemsize, stack.text_config.hidden_size
            pin = placement == "cpu" and stack.pins([itemsize * len(batch) * _padded_length(batch) * hidden_size for batch in chunk])
            with stack.embedder() as embed:
                activations = [embed(_padded_ids(batch), len(batch), placement, pin=pin) for batch in chunk]
            for index, _ in walker.blocks(range(stack.num_blocks)):
                for batch, acts in zip(chunk, activations):
                    stack.run_block(index, acts, len(batch), write_back=True, trim=False)
                return_freed_memory()
                bar.update()
            with stack.output_head() as logits_of:
                for batch, acts in zip(chunk, activations):
                    _score_rows(acts.hidden.read(0, len(batch)), batch, requests, logits_of,
                                head_positions(stack.text_config.vocab_size), results, greedy)
                    return_freed_memory()  # as after a block: the logits' heap memory
                    acts.close()
            if pin:  # the allocator keeps freed pinned memory by size; the next chunk's sizes differ
                torch.accelerator.empty_host_cache()
            bar.update()
    return results


def _sharing_plan(requests: list[Request]) -> list[tuple[int, list[int]]]:
    """Every request in one group of (prefix length, request numbers), whose prefix, tokens[:prefix
    length] of each, runs once per block (shared_context_logprobs): requests of different contexts
    (tokens[:start]) that share a start of at least MIN_SHARED_PREFIX tokens where that saves tokens
    (_merged), each other context with its own requests.

    Tokens through the blocks are the cost: run alone, a context of c tokens costs c, plus its
    continuations but their last tokens (those of one token cost nothing more, sharing its row).  In
    a group of prefix length L it costs its r distinct rests (tokens[L:-1]; the rest of one-token
    answers is the context's own rest) instead: r (c - L) plus the same continuations, so it saves L -
    (r - 1)(c - L), and the group pays L once.  The few-shot prefix of an MMLU subject (r = 1) is shared;
    a HellaSwag label of a few words before contexts of four endings (r = 4) is not."""
    contexts = _by_context(requests)
    ordered = sorted(contexts)  # prompts sharing a start are neighbours, the longest shared starts nearest
    rests = [len({requests[n].tokens[requests[n].start : -1] for n in contexts[context]}) for context in ordered]
    common = [_common_length(a, b) for a, b in zip(ordered, ordered[1:])]
    plan, placed = [], set()
    for length, members in _merged(ordered, rests, common, 0, len(ordered))[1]:
        plan.append((length, [n for i in members for n in contexts[ordered[i]]]))
        placed.update(members)
    plan += [(len(context), contexts[context]) for i, context in enumerate(ordered) if i not in placed]
    return plan


def _merged(ordered: list[tuple], rests: list[int], common: list[int], lo: int, hi: int, depth: int = 0) -> tuple[int, list]:
    """(tokens saved, [(prefix length, context indices)]) for the sorted contexts ordered[lo:hi], whose
    neighbours share common[i] tokens: one group at the prefix all of them share (of the contexts whose
    saving is positive, _sharing_plan), or the best of the runs that share more, split where the
    shared length is least (an LCP interval tree: the MMLU subjects apart, not one group of the few
    words all their prompts begin with), whichever saves more."""
    if hi - lo < 2:
        return 0, []
    length = min(common[lo : hi - 1])
    savings = {i: length - (rests[i] - 1) * (len(ordered[i]) - length) for i in range(lo, hi)}
    members = [i for i, saving in savings.items() if saving > 0]
    whole = sum(savings[i] for i in members) - length if length >= MIN_SHARED_PREFIX and len(members) > 1 else 0
    best = (whole, [(length, members)]) if whole > 0 else (0, [])
    if depth < 64:  # deeper trees (prompts each a prefix of the next) stop at the whole
        cuts = [lo] + [i + 1 for i in range(lo, hi - 1) if common[i] == length] + [hi]
        parts = [_merged(ordered, rests, common, a, b, depth + 1) for a, b in zip(cuts, cuts[1:])]
        split = sum(saved for saved, _ in parts)
        if split > best[0]:
            best = (split, [group for _, groups in parts for group in groups])
    return best


def _common_length(a: tuple, b: tuple) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _saves(group: tuple[int, list[int]], requests: list[Request]) -> bool:
    """Whether running the group's prefix once saves work: it holds different contexts, or one context's
    requests with a continuation of two or more tokens among them (single-token answers after one
    context already share one row)."""
    split, numbers = group
    return (len(numbers) > 1 and any(requests[n].scored > 1 for n in numbers)) or any(requests[n].start != split for n in numbers)


def _by_context(requests: list[Request]) -> dict[tuple[int, ...], list[int]]:
    """{context (tokens[:start]): the numbers of the requests after it}."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for number, request in enumerate(requests):
        groups[request.tokens[: request.start]].append(number)
    return groups


class _NoCache(Exception):
    """The decoder built no key/value cache, so contexts cannot be shared."""


def _sharing_fits(stack: DecoderStack, requests: list[Request], batch_size: int, max_resident_tokens: int) -> bool:
    """Whether the shared path's hidden states, and one block's key/value cache entry of its contexts (all
    on the compute device), fit the memory limits beside the embedding and LM head, which decoding keeps
    resident: the placement the unshared path would choose for a chunk of them must be the device itself."""
    config = stack.text_config
    tokens = min(sum(len(r.tokens) for r in requests), max_resident_tokens)
    longest = max(len(r.tokens) for r in requests)
    kv = _kv_values(config)  # per token, an upper bound for contexts
    return stack.placement_for(tokens * (config.hidden_size + kv), batch_size * 4 * longest, stack.resident_outside_bytes()) == "device"


def _kv_values(config) -> int:
    """Key and value entries a block's cache holds per token (2 x key/value heads x head size)."""
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * (getattr(config, "num_key_value_heads", None) or heads) * head_dim


def _past_positions(stack: DecoderStack, batch_tokens: int) -> int:
    """How many prefix positions a pass of rests may gather keys and values of (rows x the widest of their
    prefixes): those whose keys and values, with the copies attention makes of them, take as many bytes
    as the activations of batch_tokens tokens (DecoderStack.activation_values_per_token;
    _sharing_fits reserves four times a pass's activations).  The copies: the cache's concatenation with
    the rests' own keys and values beside the gathered ones, and with grouped-query attention and a mask,
    transformers' repeat_kv of that to every query head (its sdpa and eager attention), in place of
    the gathered.  A few-shot prefix of 1,500 tokens before rests of 40 would otherwise gather 37 times a
    pass's tokens: 12 times its activations' bytes for Llama 2 7B."""
    config = stack.text_config
    heads = getattr(config, "num_attention_heads", 1)
    groups = heads // (getattr(config, "num_key_value_heads", None) or heads)
    copies = max(2, 1 + groups)  # gathered + concatenated; then concatenated + repeated to every head
    return batch_tokens * stack.activation_values_per_token() // (_kv_values(config) * copies)


def _bounded(rows: list, width, most: int) -> list[list]:
    """Consecutive rows in parts whose rows times the widest of their width(row) are at most `most`,
    one row at least."""
    parts, part, widest = [], [], 0
    for row in rows:
        wide = max(widest, width(row))
        if part and (len(part) + 1) * wide > most:
            parts.append(part)
            part, wide = [], width(row)
        part.append(row)
        widest = wide
    if part:
        parts.append(part)
    return parts


@torch.inference_mode()
def shared_context_logprobs(
    stack: DecoderStack,
    requests: list[Request],
    batch_size: int = 4,
    max_resident_tokens: int = 2**18,
    progress: bool = False,
    desc: str = "Scoring",
    greedy: list | None = None,
    plan: list[tuple[int, list[int]]] | None = None,
) -> list[torch.Tensor]:
    """streamed_logprobs for requests that share prefixes: each distinct prefix runs once per block.

    `plan`: the groups, (prefix length, request numbers), default _sharing_plan's (a prefix is a whole
    context, or the start that different contexts share).  Per chunk of prefixes, in each block visit:
    the prefixes (in batches, left-padded, with the attention mask and position ids of HF generate) run
    through the block and fill its entry of a key/value cache of transformers' own class; then every
    rest of the chunk (a request's tokens after its prefix but the last, right-padded, at the positions
    after its prefix; requests with the same rest share it; in passes of similar lengths across the
    prefix batches; in parts that gather at most _past_positions of the prefixes' keys and values) runs
    through the block with that entry, selected for its prefix, as its past, so it attends to its prefix
    exactly as in one whole row; then the entry is dropped.  The rests' passes take their masks and
    rotary embeddings from the decoder's own forward with a cache standing for the prefixes (1-wide
    placeholders of their length), so sliding windows and local/global layers are the model's.  A
    continuation's first token is scored from the prefix's last position where the prefix is its whole
    context, else from its rest, as are the others.  Results equal the whole model's on each unpadded
    row (tests: float64, 1e-10; 1e-6 for Gemma 2, whose eager attention takes its softmax in float32, so
    padding to other lengths moves the 8th digit).
    """
    if greedy is not None:
        greedy[:] = [None] * len(requests)
    results: list = [None] * len(requests)
    groups = [piece for split, numbers in (_sharing_plan(requests) if plan is None else plan)
              for piece in _Group.of(requests, split, numbers).pieces(max_resident_tokens)]
    # chunks of at most max_resident_tokens prefix and rest tokens, the longest prefixes first
    chunks = chunked(sorted(groups, key=lambda group: len(group.prefix), reverse=True), _Group.size, max_resident_tokens)
    # a step per block and one for the LM head, as the unshared passes count them
    with progress_bars.bar(total=len(chunks) * (stack.num_blocks + 1), desc=desc, unit="block", enabled=progress, leave=False) as bar, \
            stack.decoding() as (inputs, logits_of):
        for chunk in chunks:
            # prefixes of similar length together (sorted), as many as batch_size of the longest
            max_tokens = batch_size * len(chunk[0].prefix)
            contexts = [_Contexts(groups, inputs, stack) for groups in _fill(chunk, lambda group: len(group.prefix), max_tokens)]
            # the chunk's rests, of all its prefixes, sorted by length: passes of little padding
            rows = sorted(((b, g, rest) for b, batch in enumerate(contexts) for g, group in enumerate(batch.groups)
                           for rest in group.rests if rest), key=lambda row: len(row[2]))
            longest = max(len(requests[n].tokens) for group in chunk for numbers in group.rests.values() for n in numbers)
            most = _past_positions(stack, batch_size * longest)
            parts = [_Continuations(sorted(part), inputs, stack, contexts)
                     for filled in _fill(rows, lambda row: len(row[2]), batch_size * longest)
                     for part in _bounded(filled, lambda row: contexts[row[0]].mask.shape[1], most)]
            for index in range(stack.num_blocks):
                block = stack.load_block(index)
                try:
                    for batch in contexts:
                        batch.run(block, index)
                    for part in parts:
                        part.run(block, index, contexts)
                    for batch in contexts:  # this block's entries are done with
                        batch.forget(index)
                finally:
                    stack.free_block(index)
                bar.update()
            _score(contexts, parts, logits_of, requests, results, greedy, head_positions(stack.text_config.vocab_size))
            bar.update()
    return results


@dataclass
class _Group:
    """A prefix and the requests after it, by their rests (tokens after the prefix but the last; () for
    a one-token answer after a prefix that is its whole context, scored from the prefix alone)."""

    prefix: tuple[int, ...]
    rests: dict[tuple[int, ...], list[int]]  # rest: the numbers of the requests that share it

    @classmethod
    def of(cls, requests: list[Request], split: int, numbers: list[int]) -> "_Group":
        """The group of requests[n] for n in numbers, whose first `split` tokens are the same."""
        rests: dict[tuple, list[int]] = defaultdict(list)
        for n in numbers:
            rests[requests[n].tokens[split:-1]].append(n)
        return cls(requests[numbers[0]].tokens[:split], dict(rests))

    def size(self) -> int:
        """Tokens through each block: the prefix and every distinct rest."""
        return len(self.prefix) + sum(len(rest) for rest in self.rests)

    def pieces(self, max_tokens: int) -> list["_Group"]:
        """The group in pieces of at most max_tokens tokens (size()), the prefix in each, one rest at least
        (a large few-shot task: its prefix then runs once per piece)."""
        return [_Group(self.prefix, dict(rests))
                for rests in chunked(list(self.rests.items()), lambda item: len(item[0]), max(1, max_tokens - len(self.prefix)))]


class _Contexts:
    """Some distinct prefixes (_Group), left-padded (HF generate's attention mask and position ids), with
    what each block is called with; each block visit fills that block's entry of their key/value cache,
    which the rests read (_Continuations) before it is dropped."""

    def __init__(self, groups, inputs, stack: DecoderStack):
        self.groups = groups  # _Group
        ids, self.mask, positions = left_padded([group.prefix for group in groups], stack.device)
        self.hidden, self.kwargs = inputs(ids, attention_mask=self.mask, position_ids=positions)
        self.cache = kv_cache(self.kwargs[0])
        if self.cache is None:
            raise _NoCache
        self.padding = (self.mask == 0)[..., None]
        self.placeholder = torch.zeros((1, 1, 1, 1), dtype=stack.dtype, device=stack.device)

    def run(self, block, index: int) -> None:
        out = block(self.hidden, **self.kwargs[index])
        # a padding position attends to nothing (NaN in eager attention); zeroed, it harms no one
        self.hidden = (out[0] if isinstance(out, tuple) else out).masked_fill(self.padding, 0)

    def forget(self, index: int) -> None:
        layer = self.cache.layers[index]
        layer.keys = layer.values = self.placeholder


class _Continuations:
    """Rests (_Group) of prefixes from any of a chunk's _Contexts batches, right-padded to the longest
    of them, each after its prefix left-padded to the widest of theirs.
    Left padding only shifts a prefix's keys by the same number of positions as the rest's
    queries, so attention, sliding windows included, is the same as in its own batch."""

    def __init__(self, rows, inputs, stack: DecoderStack, contexts: list[_Contexts]):
        device = stack.device
        self.rows = rows  # (prefix batch, group number in it, rest tokens), by batch
        self.width = max(contexts[b].mask.shape[1] for b, _, _ in rows)
        batches = sorted({b for b, _, _ in rows})
        self.select = [(b, torch.tensor([g for c, g, _ in rows if c == b], device=device)) for b in batches]
        context_mask = torch.cat([F.pad(contexts[b].mask[chosen], (self.width - contexts[b].mask.shape[1], 0))
                                  for b, chosen in self.select])
        widest = max(len(rest) for _, _, rest in rows)
        ids = torch.zeros((len(rows), widest), dtype=torch.long)
        for r, (_, _, rest) in enumerate(rows):
            ids[r, : len(rest)] = torch.tensor(rest)
        ids = ids.to(device)
        # The right padding is not masked: a causal model's real positions never attend to it, and masked,
        # a padding position past a sliding window would attend to nothing, turn NaN, and in the next
        # block spread through the weight 0 its key gets (Gemma 2 in float64).
        own_mask = torch.ones((len(rows), widest), dtype=torch.long, device=device)
        try:
            self.past = type(contexts[0].cache)(config=stack.decoder.config)
        except TypeError:  # a cache class built otherwise than transformers' DynamicCache
            raise _NoCache from None
        # 1-wide placeholders of the contexts' length, so that the decoder makes the masks of a whole row
        self.placeholder = torch.zeros((1, 1, self.width, 1), dtype=stack.dtype, device=device)
        for layer_index in range(len(self.past.layers)):
            self.past.update(self.placeholder, self.placeholder, layer_index)
        # the past's length per layer: the contexts' width, or a sliding window's, which keeps fewer
        self.lengths = [layer.keys.shape[-2] for layer in self.past.layers]
        self.hidden, self.kwargs = inputs(
            ids, cache=self.past, attention_mask=torch.cat([context_mask, own_mask], dim=1),
            position_ids=context_mask.sum(-1)[:, None] + torch.arange(widest, device=device),
        )

    def run(self, block, index: int, contexts: list[_Contexts]) -> None:
        """Block `index` over the continuations, their contexts' entries of that block as their past."""
        own = self.past.layers[index]
        own.keys, own.values = (self._gathered([contexts[b].cache.layers[index].keys for b, _ in self.select], index),
                                self._gathered([contexts[b].cache.layers[index].values for b, _ in self.select], index))
        out = block(self.hidden, **self.kwargs[index])
        self.hidden = out[0] if isinstance(out, tuple) else out
        own.keys = own.values = self.placeholder

    def _gathered(self, entries: list[torch.Tensor], index: int) -> torch.Tensor:
        """The rows' contexts' keys (or values) of block `index`, (rows, heads, length, head_dim): each
        context batch's entry (batch, heads, its length, head_dim) selected for the rows, a narrower
        one left-padded with zeros (its window's last positions), written once into one tensor: a copy
        per row, block and pass, where selecting, padding and concatenating made three (profiled on 100
        HellaSwag questions, SmolLM2, CPU: 0.3 s of 16 instead of 0.5, and a third of the transient memory)."""
        first = entries[0]
        length = self.lengths[index]
        out = first.new_empty((len(self.rows), first.shape[1], length, first.shape[3]))
        start = 0
        for entry, (_, chosen) in zip(entries, self.select):
            end, pad = start + len(chosen), length - entry.shape[-2]
            if pad:
                out[start:end, :, :pad].zero_()
                out[start:end, :, pad:] = entry[chosen]
            else:  # whole rows of a contiguous tensor: gathered in place
                torch.index_select(entry, 0, chosen, out=out[start:end])
            start = end
        return out


def _score(contexts: list[_Contexts], parts: list[_Continuations], logits_of, requests: list[Request], results: list,
           greedy: list | None, positions: int) -> None:
    """Log-probabilities of every continuation: its first token from its prefix's last position where
    the prefix is its whole context, the others (all where the prefix is shorter) from its rest's
    positions. Only the positions scored get logits (a part's rows are padded to its longest, and a rest
    after a few-shot prefix starts with its question; the LM head costs per position about what a block
    does), packed, `positions` at a time (head_positions), the prefixes' last positions as well: what is
    kept of them is each request's first-token score, not a row of the vocabulary per prefix."""
    def head(hidden):
        return logits_of(hidden[None])[0]

    first: dict[int, tuple] = {}  # request number: (its first token's log-probability, whether the argmax)
    for batch in contexts:
        after = [(g, n) for g, group in enumerate(batch.groups) for numbers in group.rests.values() for n in numbers
                 if requests[n].start == len(group.prefix)]
        wanted = [(g, requests[n].tokens[requests[n].start : requests[n].start + 1]) for g, n in after]
        if after:
            first.update(zip([n for _, n in after], _packed_scores(batch.hidden[:, -1], wanted, head, positions, greedy is not None)))
    return_freed_memory()

    def record(n: int, rest: torch.Tensor, rest_hits: torch.Tensor | None) -> None:
        picked, hit = first.get(n, (rest[:0], None))
        results[n] = torch.cat([picked, rest])
        if greedy is not None:
            greedy[n] = (hit is None or bool(hit.all())) and bool(rest_hits.all())

    for part in parts:
        spans, wanted, numbers, offset = [], [], [], 0  # the rows' scored positions, packed; per request, its targets there
        for r, (b, g, rest) in enumerate(part.rows):
            split = len(contexts[b].groups[g].prefix)
            # position split + j of the row (its rest's j-th) predicts token split + j + 1
            scored = [(n, max(requests[n].start - 1 - split, 0)) for n in contexts[b].groups[g].rests[rest]]
            lo = min(j for _, j in scored)
            spans.append(part.hidden[r, lo : len(rest)])
            for n, j in scored:
                wanted.append((offset + j - lo, requests[n].tokens[split + j + 1 :]))
                numbers.append(n)
            offset += len(rest) - lo
        for n, (picked, hits) in zip(numbers, _packed_scores(torch.cat(spans), wanted, head, positions, greedy is not None)):
            record(n, picked, hits)
        # logits just under 32 MiB come from glibc's heap (reuse_freed_memory), which only a trim returns
        return_freed_memory()
    for n in first:
        if requests[n].scored == 1:  # in no pass: its one token is the prefix's
            record(n, torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.bool))


@torch.inference_mode()
def whole_model_logprobs(model, requests: list[Request], batch_size: int = 4) -> list[torch.Tensor]:
    """The same scores from an ordinary transformers model held whole (reference, and quantized models),
    with the logits of the model's own forward: where it takes transformers' `logits_to_keep`, only of the
    positions from the batch's first scored one to its longest row's end (a one-token answer after a
    long context: a few positions, not rows x length x vocabulary)."""
    results: list = [None] * len(requests)
    device = next(model.parameters()).device
    keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
    for chunk in _batches(_rows(requests), batch_size, max_resident_tokens=2**62):
        for batch in chunk:
            start = min(row.first_position for row in batch) if keeps else 0
            kept = {"logits_to_keep": torch.arange(start, max(len(row.tokens) for row in batch), device=device)} if keeps else {}
            logits = model(input_ids=_padded_ids(batch).to(device), use_cache=False, **kept).logits
            _score_rows(logits, batch, requests, lambda scores: scores, head_positions(logits.shape[-1]), results, first_kept=start)
    return results
