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

import torch

from .. import progress as progress_bars
from ..blocks import DecoderStack
from ..walker import BlockWalker

PAD_TO_MULTIPLE = 8
HEAD_POSITIONS = 512  # positions per LM-head call: bounds the logits' memory


@dataclass(frozen=True)
class Request:
    tokens: tuple[int, ...]
    start: int  # first scored position, >= 1

    def __post_init__(self):
        if not 1 <= self.start < len(self.tokens):
            raise ValueError(f"start {self.start} must be in [1, {len(self.tokens)})")


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
    """Rows sorted by length, in batches of batch_size, in chunks of at most max_resident_tokens padded tokens."""
    ordered = sorted(rows, key=lambda row: len(row.tokens), reverse=True)
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    chunks, chunk, tokens = [], [], 0
    for batch in batches:
        size = len(batch) * _padded_length(batch)
        if chunk and tokens + size > max_resident_tokens:
            chunks.append(chunk)
            chunk, tokens = [], 0
        chunk.append(batch)
        tokens += size
    if chunk:
        chunks.append(chunk)
    return chunks


def _padded_length(batch: list[_Row]) -> int:
    longest = max(len(row.tokens) for row in batch)
    return -(-longest // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE


def _padded_ids(batch: list[_Row]) -> torch.Tensor:
    ids = torch.zeros((len(batch), _padded_length(batch)), dtype=torch.long)
    for i, row in enumerate(batch):
        ids[i, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
    return ids


def _score_row(hidden: torch.Tensor, row: _Row, requests: list[Request], logits_of, results: list) -> None:
    """Fills results[n] for every request n read from this row; hidden is (padded length, hidden_size)."""
    for n in row.requests:
        results[n] = torch.empty(len(requests[n].tokens) - requests[n].start, dtype=torch.float64)
    for a in range(row.first_position, len(row.tokens), HEAD_POSITIONS):
        b = min(a + HEAD_POSITIONS, len(row.tokens))
        logits = logits_of(hidden[a:b])
        log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(dim=-1).cpu()
        for n in row.requests:
            request = requests[n]
            lo, hi = max(a, request.start - 1), b  # positions j predict token j + 1
            if lo >= hi:
                continue
            targets = torch.tensor(request.tokens[lo + 1 : hi + 1], dtype=torch.long)
            picked = log_probs[lo - a : hi - a].gather(1, targets[:, None]).squeeze(1)
            results[n][lo - (request.start - 1) : hi - (request.start - 1)] = picked.double()


@torch.inference_mode()
def streamed_logprobs(
    stack: DecoderStack,
    requests: list[Request],
    batch_size: int = 4,
    max_resident_tokens: int = 2**18,
    progress: bool = False,
    desc: str = "Scoring",
) -> list[torch.Tensor]:
    """Per request, the float64 log-probabilities of tokens[start:], with one block resident at a time."""
    results: list = [None] * len(requests)
    chunks = _batches(_rows(requests), batch_size, max_resident_tokens)
    steps = len(chunks) * (stack.num_blocks + 1)
    with progress_bars.bar(total=steps, desc=desc, unit="block", enabled=progress, leave=False) as bar, \
            BlockWalker(stack, read_ahead=stack.device.type == "cuda") as walker:
        for chunk in chunks:
            resident = sum(len(batch) * _padded_length(batch) for batch in chunk) * stack.text_config.hidden_size
            placement = stack.placement_for(resident, batch_size * max(_padded_length(batch) for batch in chunk))
            with stack.embedder() as embed:
                activations = [embed(_padded_ids(batch), batch_size, placement) for batch in chunk]
            for index, _ in walker.blocks(range(stack.num_blocks)):
                for acts in activations:
                    stack.run_block(index, acts, batch_size, write_back=True)
                bar.update()
            with stack.output_head() as logits_of:
                for batch, acts in zip(chunk, activations):
                    hidden = acts.hidden.read(0, len(batch))
                    for i, row in enumerate(batch):
                        _score_row(hidden[i], row, requests, logits_of, results)
                    acts.close()
            bar.update()
    return results


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
