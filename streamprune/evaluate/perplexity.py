"""Perplexity, as Wanda and SparseGPT report it, with one block resident at a time.

Protocol: tokenize the whole text once with the tokenizer's defaults, cut it into non-overlapping
windows of `seqlen` tokens, drop the incomplete tail; perplexity = exp(mean negative log-likelihood of
every token of a window given the tokens before it in that window).  `max_windows` keeps the first N.

Slices (`slices=S`, our reading of the paper's "seven fixed slices"): S runs of k consecutive windows,
evenly spaced over the whole stream (the first starts at window 0, the last ends at the last window),
with k = max_windows // S, or n // S without max_windows (then the slices partition the stream).
Perplexity is reported per slice, as their mean, and over all the windows of all slices (`value`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..calibration import JSONL_SUFFIXES, file_documents
from ..errors import StreamPruneError
from ..hub import datasets_from_cache_when_offline, failure
from .loglikelihood import Request

HUB_TEXTS = ("wikitext103", "wikitext2", "c4")


@dataclass(frozen=True)
class Perplexity:
    value: float
    windows: int
    tokens: int  # tokens predicted: seqlen - 1 per window
    slices: list[float] = field(default_factory=list)
    slices_mean: float | None = None


def load_text(source: str) -> str:
    """A local file, or a named evaluation text from the hub.

    Local: a text file as it is, or a .jsonl file's `text` fields joined with spaces (as Wanda joins C4
    documents).  Hub: WikiText-103's validation split (the paper's) and WikiText-2's test split (what Wanda
    and SparseGPT report), rows joined with blank lines; C4 as Wanda takes it.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix in JSONL_SUFFIXES:
            return " ".join(file_documents(path))
        return path.read_text(encoding="utf-8")
    if source not in HUB_TEXTS:
        raise StreamPruneError(f"perplexity text {source!r} is neither a file nor one of {', '.join(HUB_TEXTS)}")
    import datasets

    with datasets_from_cache_when_offline() as offline:  # offline: the cached copy at once, or the error
        try:
            if source == "c4":  # Wanda's protocol: the first 1100 documents of the first validation shard
                rows = datasets.load_dataset(
                    "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
                )
                return " ".join(rows[:1100]["text"])
            name, split = ("wikitext-103-raw-v1", "validation") if source == "wikitext103" else ("wikitext-2-raw-v1", "test")
            return "\n\n".join(datasets.load_dataset("Salesforce/wikitext", name, split=split)["text"])
        except Exception as exc:
            why = failure(exc, offline)
            raise StreamPruneError(f"could not load {source} from the Hugging Face Hub ({why}); offline, pass a local text file with --ppl") from exc


def text_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (windows, seqlen) of the whole text's token ids; the tail is dropped."""
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise StreamPruneError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: count * seqlen].view(count, seqlen)


def slice_ranges(total_windows: int, slices: int, max_windows: int | None) -> list[range]:
    """S runs of k consecutive window indices, evenly spaced from the first window to the last."""
    if max_windows is not None and max_windows < slices:
        raise StreamPruneError(f"--max-windows {max_windows} cannot make {slices} slices: give at least one window per slice")
    per_slice = (max_windows if max_windows is not None else total_windows) // slices
    per_slice = min(per_slice, total_windows // slices)
    if per_slice == 0:
        raise StreamPruneError(f"{total_windows} windows cannot make {slices} slices; use a smaller --seqlen")
    last_start = total_windows - per_slice
    starts = [round(i * last_start / (slices - 1)) if slices > 1 else 0 for i in range(slices)]
    return [range(start, start + per_slice) for start in starts]


def perplexity_requests(tokenizer, text: str, seqlen: int, max_windows: int | None = None, slices: int | None = None):
    """The windows as requests (every token from the second scored), and the slices' window ranges."""
    if slices:
        every = text_windows(tokenizer, text, seqlen)
        ranges = slice_ranges(every.shape[0], slices, max_windows)
        windows = torch.cat([every[r.start : r.stop] for r in ranges])
    else:
        windows = text_windows(tokenizer, text, seqlen, max_windows)
        ranges = []
    return [Request(tuple(row.tolist()), start=1) for row in windows], ranges


def perplexity_from(logprobs: list[torch.Tensor], ranges: list[range]) -> Perplexity:
    """Perplexity over all windows, and per slice (the slices' windows come in order, one run after another)."""

    def ppl(rows) -> float:
        return math.exp(-torch.cat([logprobs[i] for i in rows]).mean().item())

    per_slice, offset = [], 0
    for r in ranges:
        per_slice.append(ppl(range(offset, offset + len(r))))
        offset += len(r)
    return Perplexity(
        value=ppl(range(len(logprobs))),
        windows=len(logprobs),
        tokens=sum(len(lp) for lp in logprobs),
        slices=per_slice,
        slices_mean=sum(per_slice) / len(per_slice) if per_slice else None,
    )


def perplexity(score, tokenizer, text: str, seqlen: int, max_windows: int | None = None, slices: int | None = None) -> Perplexity:
    """`score(requests) -> per-request log-probabilities` is streamed or whole-model scoring."""
    requests, ranges = perplexity_requests(tokenizer, text, seqlen, max_windows, slices)
    return perplexity_from(score(requests), ranges)
