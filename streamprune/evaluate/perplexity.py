"""Perplexity with one block resident at a time.

Protocol (as Wanda and SparseGPT report it): tokenize the whole text once with the tokenizer's
defaults, cut it into non-overlapping windows of `seqlen` tokens, drop the incomplete tail, optionally
keep the first `max_windows`; perplexity = exp(mean negative log-likelihood of every token of a window
given the tokens before it in that window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..blocks import DecoderStack
from ..errors import StreamPruneError


@dataclass(frozen=True)
class Perplexity:
    value: float
    windows: int
    tokens: int  # tokens predicted (seqlen - 1 per window)


def text_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (windows, seqlen) of the whole text's token ids; the tail is dropped."""
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise StreamPruneError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: count * seqlen].view(count, seqlen)


@torch.inference_mode()
def streamed_perplexity(stack: DecoderStack, windows: torch.Tensor, batch_size: int, progress: bool = False, desc: str = "Perplexity") -> Perplexity:
    """Every window through every block (one block resident), then the final norm and LM head."""
    hidden = stack.block_inputs(windows, batch_size)
    for index in tqdm(range(stack.num_blocks), desc=desc, unit="block", disable=not progress, leave=False):
        stack.load_block(index)
        stack.run_block(index, hidden, batch_size, write_back=True)
        stack.free_block(index)
    total_nll = 0.0
    with stack.output_head() as logits_of:
        for start in range(0, windows.shape[0], batch_size):
            logits = logits_of(hidden[start : start + batch_size])
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            targets = windows[start : start + batch_size, 1:].to(logits.device)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total_nll += nll.item()
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    return Perplexity(value=math.exp(total_nll / tokens), windows=windows.shape[0], tokens=tokens)


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise StreamPruneError(f"evaluation text {path} does not exist")
    return path.read_text(encoding="utf-8")
