"""Log-probabilities of tokens given the tokens before them, one block resident at a time.

A Request is a row of token ids and the index of its first scored token: the result is
log p(tokens[j] | tokens[:j]) for every j >= start.  Perplexity scores whole windows from token 1;
a multiple-choice question scores the tokens of each answer after its prompt.

Requests that feed the model the same tokens (the answers " yes" and " no" after the same prompt)
share one row.  Rows are sorted by length and batched; a batch is right-padded, which a causal model
never looks at from a real token, so no attention mask is needed.  Batches are kept resident in rounds
of at most `max_resident_tokens` padded tokens: each round streams through every block once, and where
its hidden states live (device, host memory or disk) is chosen for the whole round against the memory
limits, since all of them are resident at once.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import partial

import torch

from .. import progress as progress_bars
from ..blocks import DecoderStack, kv_cache, left_padded, return_freed_memory
from ..walker import BlockWalker

PAD_TO_MULTIPLE = 8
HEAD_POSITIONS = 512  # positions per LM-head call: bounds the logits' memory
MIN_PASS_TOKENS = 256  # below this a pass's matrix products lose more speed than padding costs (_fill)


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


def _score_row(hidden: torch.Tensor, row: _Row, requests: list[Request], logits_of, results: list, greedy: list | None = None) -> None:
    """Fills results[n] for every request n read from this row; hidden is (padded length, hidden_size).
    With `greedy`, greedy[n] is whether every scored token is the most likely one (the harness's
    is_greedy: argmax of the logits, first index on ties, as torch.argmax)."""
    for n in row.requests:
        results[n] = torch.empty(requests[n].scored, dtype=torch.float64)
        if greedy is not None:
            greedy[n] = True
    for a in range(row.first_position, len(row.tokens), HEAD_POSITIONS):
        b = min(a + HEAD_POSITIONS, len(row.tokens))
        log_probs = _log_probs(logits_of(hidden[a:b]))
        for n in row.requests:
            request = requests[n]
            lo, hi = max(a, request.start - 1), b  # positions j predict token j + 1
            if lo >= hi:
                continue
            picked, is_greedy = _picked(log_probs[lo - a : hi - a], request.tokens[lo + 1 : hi + 1], greedy is not None)
            results[n][lo - (request.start - 1) : hi - (request.start - 1)] = picked
            if greedy is not None:
                greedy[n] = greedy[n] and is_greedy


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the vocabulary, in float32 at least, on the CPU."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=-1).cpu()


def _picked(log_probs: torch.Tensor, targets, greedy: bool) -> tuple[torch.Tensor, bool | None]:
    """The float64 log-probabilities of `targets` at their positions of log_probs (positions, vocab), and
    with `greedy` whether each is the argmax (first index on ties, as torch.argmax; None without)."""
    targets = torch.tensor(targets, dtype=torch.long)
    picked = log_probs.gather(1, targets[:, None]).squeeze(1).double()
    return picked, bool((log_probs.argmax(dim=-1) == targets).all()) if greedy else None


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
    A list passed as `greedy` receives, per request, whether each scored token was the argmax.

    With share_contexts, requests whose contexts (tokens[:start]) are equal and whose continuations
    differ beyond their first token (the endings of a HellaSwag question) run their context once per
    block, and each continuation attends to its keys and values (shared_context_logprobs).
    """
    if greedy is not None:
        greedy[:] = [None] * len(requests)
    results: list = [None] * len(requests)
    shared = [n for group in _shared_groups(requests) for n in group] if share_contexts else []
    if shared and not _sharing_fits(stack, [requests[n] for n in shared], batch_size, max_resident_tokens):
        shared = []
    if shared:  # those requests one way, the others the other, each result where it belongs
        rest = sorted(set(range(len(requests))) - set(shared))
        for numbers, score in ((shared, shared_context_logprobs), (rest, partial(streamed_logprobs, share_contexts=False))):
            flags = [] if greedy is not None else None  # argmax only where asked for
            try:
                scores = score(stack, [requests[n] for n in numbers], batch_size, max_resident_tokens, progress, desc, flags) if numbers else []
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
            with stack.embedder() as embed:
                activations = [embed(_padded_ids(batch), len(batch), placement) for batch in chunk]
            for index, _ in walker.blocks(range(stack.num_blocks)):
                for batch, acts in zip(chunk, activations):
                    stack.run_block(index, acts, len(batch), write_back=True, trim=False)
                return_freed_memory()
                bar.update()
            with stack.output_head() as logits_of:
                for batch, acts in zip(chunk, activations):
                    hidden = acts.hidden.read(0, len(batch))
                    for i, row in enumerate(batch):
                        _score_row(hidden[i], row, requests, logits_of, results, greedy)
                    acts.close()
            bar.update()
    return results


def _shared_groups(requests: list[Request]) -> list[list[int]]:
    """Request numbers grouped by context (tokens[:start]), for groups where sharing saves work: at
    least two requests, and a continuation of two or more tokens among them (single-token answers after
    one context already share one row)."""
    return [numbers for numbers in _by_context(requests).values()
            if len(numbers) > 1 and any(requests[n].scored > 1 for n in numbers)]


def _by_context(requests: list[Request]) -> dict[tuple[int, ...], list[int]]:
    """{context (tokens[:start]): the numbers of the requests after it}."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for number, request in enumerate(requests):
        groups[request.tokens[: request.start]].append(number)
    return groups


class _NoCache(Exception):
    """The decoder built no key/value cache, so contexts cannot be shared."""


def _sharing_fits(stack: DecoderStack, requests: list[Request], batch_size: int, max_resident_tokens: int) -> bool:
    """Whether the shared path's hidden states (all on the compute device) fit the memory limits: the
    placement the unshared path would choose for a chunk of them must be the device itself."""
    tokens = min(sum(len(r.tokens) for r in requests), max_resident_tokens)
    longest = max(len(r.tokens) for r in requests)
    return stack.placement_for(tokens * stack.text_config.hidden_size, batch_size * 4 * longest) == "device"


@torch.inference_mode()
def shared_context_logprobs(
    stack: DecoderStack,
    requests: list[Request],
    batch_size: int = 4,
    max_resident_tokens: int = 2**18,
    progress: bool = False,
    desc: str = "Scoring",
    greedy: list | None = None,
) -> list[torch.Tensor]:
    """streamed_logprobs for requests that share contexts: each distinct context runs once per block.

    Per chunk of contexts, in each block visit: the contexts (left-padded, with the attention mask and
    position ids of HF generate) run through the block and fill its entry of a key/value cache of
    transformers' own class; then every continuation (its tokens but the last, right-padded, at the
    positions after its context) runs through the block with that entry, selected for its context, as
    its past, so it attends to its context exactly as in one whole row.  The continuation pass's masks and
    rotary embeddings come from the decoder's own forward with a cache standing for the contexts
    (1-wide placeholders of their length), so sliding windows and local/global layers are the model's.
    The first continuation token is scored from the context's last position.  Results equal the
    whole model's on each unpadded row (tests: float64, 1e-10; 1e-6 for Gemma 2, whose eager attention
    takes its softmax in float32, so padding to other lengths moves the 8th digit).
    """
    if greedy is not None:
        greedy[:] = [None] * len(requests)
    results: list = [None] * len(requests)
    ordered = sorted(_by_context(requests).items(), key=lambda item: len(item[0]), reverse=True)
    # chunks of at most max_resident_tokens context plus continuation tokens
    chunks = chunked(ordered, lambda group: len(group[0]) + sum(requests[n].scored for n in group[1]), max_resident_tokens)
    with progress_bars.bar(total=len(chunks) * stack.num_blocks, desc=desc, unit="block", enabled=progress, leave=False) as bar, \
            stack.decoding() as (inputs, logits_of):
        for chunk in chunks:
            # contexts of similar length together (sorted), as many as batch_size of the longest, and their continuations
            max_tokens = batch_size * len(chunk[0][0])
            batches = [_SharedBatch(groups, requests, inputs, stack, max_tokens)
                       for groups in _fill(chunk, lambda group: len(group[0]), max_tokens)]
            for index in range(stack.num_blocks):
                block = stack.load_block(index)
                try:
                    for batch in batches:
                        batch.run(block, index)
                finally:
                    stack.free_block(index)
                bar.update()
            for batch in batches:
                batch.score(logits_of, requests, results, greedy)
    return results


class _Continuations:
    """Continuations of some of a _SharedBatch's contexts, right-padded to the longest of them, with the
    cache that stands for their contexts and what each block is called with."""

    def __init__(self, rows, requests: list[Request], inputs, stack: DecoderStack, cache, mask, placeholder):
        device = stack.device
        self.rows = rows  # (context number in the batch, request number)
        widest = max(requests[n].scored - 1 for _, n in rows)
        self.owner = torch.tensor([g for g, _ in rows], device=device)
        ids = torch.zeros((len(rows), widest), dtype=torch.long)
        own_mask = torch.zeros((len(rows), widest), dtype=torch.long)
        for r, (_, n) in enumerate(rows):
            tail = requests[n].tokens[requests[n].start : -1]
            ids[r, : len(tail)] = torch.tensor(tail)
            own_mask[r, : len(tail)] = 1
        ids, own_mask = ids.to(device), own_mask.to(device)
        try:
            self.past = type(cache)(config=stack.decoder.config)
        except TypeError:  # a cache class built otherwise than transformers' DynamicCache
            raise _NoCache from None
        for layer_index in range(len(self.past.layers)):  # 1-wide placeholders of the contexts' length
            self.past.update(placeholder, placeholder, layer_index)
        self.hidden, self.kwargs = inputs(
            ids, cache=self.past, attention_mask=torch.cat([mask[self.owner], own_mask], dim=1),
            position_ids=mask.sum(-1)[self.owner][:, None] + torch.arange(widest, device=device),
        )


class _SharedBatch:
    """Some contexts (left-padded) and their continuations (right-padded, in groups of similar length),
    with what each block is called with: shared_context_logprobs's unit of work."""

    def __init__(self, groups, requests: list[Request], inputs, stack: DecoderStack, max_tokens: int):
        device = stack.device
        self.groups = groups
        ids, mask, positions = left_padded([context for context, _ in groups], device)
        self.hidden, self.kwargs = inputs(ids, attention_mask=mask, position_ids=positions)
        self.cache = kv_cache(self.kwargs[0])
        if self.cache is None:
            raise _NoCache
        self.padding = (mask == 0)[..., None]
        self.placeholder = torch.zeros((1, 1, ids.shape[1], 1), dtype=stack.dtype, device=device)
        rows = sorted(((g, n) for g, (_, numbers) in enumerate(groups) for n in numbers if requests[n].scored > 1),
                      key=lambda row: requests[row[1]].scored)
        # sorted by length, so that little of a pass is padding
        self.parts = [_Continuations(part, requests, inputs, stack, self.cache, mask, self.placeholder)
                      for part in _fill(rows, lambda row: requests[row[1]].scored - 1, max_tokens)]

    def run(self, block, index: int) -> None:
        """Block `index` over the contexts (filling its cache entry), then over the continuations."""
        out = block(self.hidden, **self.kwargs[index])
        # a padding position attends to nothing (NaN in eager attention); zeroed, it harms no one
        self.hidden = (out[0] if isinstance(out, tuple) else out).masked_fill(self.padding, 0)
        layer = self.cache.layers[index]
        for part in self.parts:
            own = part.past.layers[index]
            own.keys, own.values = layer.keys[part.owner], layer.values[part.owner]
            out = block(part.hidden, **part.kwargs[index])
            part.hidden = out[0] if isinstance(out, tuple) else out
            own.keys = own.values = self.placeholder  # this block's entries are done with
        layer.keys = layer.values = self.placeholder

    def score(self, logits_of, requests: list[Request], results: list, greedy: list | None) -> None:
        """Log-probabilities of every continuation: its first token from its context's last position,
        the others from its own positions, the logits of at most HEAD_POSITIONS positions at a time
        (a batch's continuations hold up to batch_size times its longest context in tokens)."""
        last = logits_of(self.hidden[:, -1:])[:, -1]  # (contexts, vocab)

        def record(n: int, logits: torch.Tensor) -> None:
            request = requests[n]
            results[n], flag = _picked(_log_probs(logits), request.tokens[request.start :], greedy is not None)
            if greedy is not None:
                greedy[n] = flag

        for g, (_, numbers) in enumerate(self.groups):
            for n in numbers:
                if requests[n].scored == 1:  # in no pass: its one token is the context's
                    record(n, last[g : g + 1])
        for part in self.parts:
            rows = max(1, HEAD_POSITIONS // part.hidden.shape[1])
            for a in range(0, len(part.rows), rows):
                logits = logits_of(part.hidden[a : a + rows])  # (rows, widest, vocab)
                for r, (g, n) in enumerate(part.rows[a : a + rows]):
                    record(n, torch.cat([last[g : g + 1], logits[r, : requests[n].scored - 1]]))


@torch.inference_mode()
def whole_model_logprobs(model, requests: list[Request], batch_size: int = 4) -> list[torch.Tensor]:
    """The same scores from an ordinary transformers model held whole (reference, and quantized models),
    with the logits of the model's own forward."""
    results: list = [None] * len(requests)
    device = next(model.parameters()).device
    for chunk in _batches(_rows(requests), batch_size, max_resident_tokens=2**62):
        for batch in chunk:
            logits = model(input_ids=_padded_ids(batch).to(device), use_cache=False).logits
            for i, row in enumerate(batch):
                _score_row(logits[i], row, requests, lambda scores: scores, results)
    return results
