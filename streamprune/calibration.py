"""Calibration corpus -> seeded windows of token ids.

Sources: `wikitext103` and `c4` from the Hugging Face hub (datasets), or a local path: a plain text or
`.raw` file (one document), a `.jsonl` file (one document per line, field `text`), a folder of such
files, or a `.safetensors` file holding an `input_ids` tensor recorded by an earlier run.

Sampling: documents are cut at line breaks into pieces of at most PIECE_CHARS characters; the pieces
are visited in a seeded random order and tokenized (no special tokens) into one stream until it holds
POOL_FACTOR times the tokens the windows need, or the corpus ends.  Window starts are then drawn
uniformly at random (seeded) from that stream; windows may overlap, as in the reference Wanda code.

Overlap: the windows' distinct tokens (the positions of the stream that at least one window covers)
are counted and recorded.  Drawn from a full pool, random windows repeat about 12% of their tokens
(n windows of a stream n / POOL_FACTOR windows long cover 1 - exp(-1/4) of it).  When the corpus ran
out before the pool was full and more than OVERLAP_WARNING of the tokens repeat, a warning gives both
numbers: the statistics then come from markedly less text than nsamples x seqlen.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import progress as progress_bars
from .checkpoint import write_atomic
from .errors import StreamPruneError
from .hub import datasets_from_cache_when_offline, failure

log = logging.getLogger("streamprune")

PIECE_CHARS = 100_000
POOL_FACTOR = 4
OVERLAP_WARNING = 0.2  # share of repeated calibration tokens that is warned about (a full pool gives ~0.12)
TEXT_SUFFIXES = (".txt", ".raw", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")


HUB_CORPORA = ("wikitext103", "c4")


def hub_documents(name: str) -> list[str]:
    """The named corpus from the Hugging Face hub (needs the network, or the datasets cache)."""
    import datasets

    with datasets_from_cache_when_offline() as offline:  # offline: the cached copy at once, or the error
        try:
            if name == "wikitext103":
                rows = datasets.load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1", split="train")
                return ["".join(rows["text"])]  # the rows are the lines of the raw file, in order
            rows = datasets.load_dataset(
                "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"
            )
            return list(rows["text"])
        except Exception as exc:
            why = failure(exc, offline)
            raise StreamPruneError(
                f"could not load calibration corpus {name!r} from the Hugging Face Hub ({why}); offline, pass a local text or .jsonl file with --calib"
            ) from exc


def file_documents(path: Path) -> list[str]:
    """The documents of one local file: each line's `text` of a .jsonl/.json file, else the whole file."""
    if path.suffix in JSONL_SUFFIXES:
        documents = []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    documents.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise StreamPruneError(f"{path} line {number} is not JSON with a 'text' field") from exc
        return documents
    return [path.read_text(encoding="utf-8", errors="replace")]


def local_documents(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
        if not files:
            raise StreamPruneError(f"calibration folder {path} has no .txt, .raw or .jsonl files")
        return [doc for file in files for doc in file_documents(file)]
    return file_documents(path)


def split_pieces(documents: list[str], piece_chars: int = PIECE_CHARS) -> list[str]:
    """Each document cut at line breaks into pieces of at most about piece_chars characters."""
    pieces = []
    for document in documents:
        start = 0
        while start < len(document):
            end = start + piece_chars
            if end < len(document):
                newline = document.rfind("\n", start, end)
                end = newline + 1 if newline > start else end
            pieces.append(document[start:end])
            start = end
    return [piece for piece in pieces if piece.strip()]


def token_stream(tokenizer, documents: list[str], needed_tokens: int, seed: int, progress: bool = False) -> torch.Tensor:
    """Token ids of seeded-random pieces of the corpus, at least POOL_FACTOR * needed_tokens if it has them."""
    pieces = split_pieces(documents)
    random.Random(seed).shuffle(pieces)
    ids: list[int] = []
    target = POOL_FACTOR * needed_tokens
    with progress_bars.bar(total=target, desc="Tokenizing calibration text", unit="tok", enabled=progress, leave=False) as bar:
        for piece in pieces:
            new = tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
            ids.extend(new)
            bar.update(min(len(new), max(0, target - bar.n)))
            if len(ids) >= target:
                break
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration windows and where they came from.

    input_ids: (windows, seqlen) int64 token ids.  starts: (windows,) int64, each window's first position
    in the token stream it was drawn from, and text_tokens: that stream's length; both None for ids
    recorded without them (given by hand).
    """

    input_ids: torch.Tensor
    starts: torch.Tensor | None = None
    text_tokens: int | None = None

    @property
    def distinct_tokens(self) -> int | None:
        """How many positions of the stream at least one window covers (None when the starts are unknown)."""
        if self.starts is None:
            return None
        seqlen = self.input_ids.shape[1]
        covered, reach = 0, 0
        for start in sorted(self.starts.tolist()):
            covered += max(0, start + seqlen - max(start, reach))
            reach = max(reach, start + seqlen)
        return covered

    def summary(self) -> dict:
        """For the run manifest: windows, seqlen, tokens (windows x seqlen), distinct_tokens, text_tokens."""
        windows, seqlen = self.input_ids.shape
        return {"windows": windows, "seqlen": seqlen, "tokens": windows * seqlen,
                "distinct_tokens": self.distinct_tokens, "text_tokens": self.text_tokens}

    def head(self, nwindows: int) -> "CalibrationSet":
        starts = None if self.starts is None else self.starts[:nwindows].contiguous()
        return CalibrationSet(self.input_ids[:nwindows].contiguous(), starts, self.text_tokens)


def draw_windows(stream: torch.Tensor, nwindows: int, seqlen: int, seed: int) -> CalibrationSet:
    """nwindows windows of seqlen consecutive tokens at seeded uniform random starts."""
    if stream.numel() < seqlen:
        raise StreamPruneError(
            f"the calibration text has {stream.numel()} tokens, fewer than one window of seqlen {seqlen}; "
            "give more text or a smaller --seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (nwindows,), generator=generator)
    ids = torch.stack([stream[s : s + seqlen] for s in starts.tolist()])
    return CalibrationSet(ids, starts, stream.numel())


def warn_if_overlapping(calibration: CalibrationSet) -> None:
    """A warning when the corpus ran out before the pool was full and the windows repeat more than
    OVERLAP_WARNING of their tokens."""
    distinct, text = calibration.distinct_tokens, calibration.text_tokens
    windows, seqlen = calibration.input_ids.shape
    asked = windows * seqlen
    if distinct is None or text is None or text >= POOL_FACTOR * asked or distinct >= (1 - OVERLAP_WARNING) * asked:
        return
    log.warning(
        "the calibration text has only %s tokens: the %d windows of %d tokens (%s tokens) cover %s distinct "
        "tokens, so %.0f%% of the calibration tokens repeat others; give more text, or fewer or shorter windows",
        f"{text:,}", windows, seqlen, f"{asked:,}", f"{distinct:,}", 100 * (1 - distinct / asked),
    )


def save_windows(path: Path, calibration: CalibrationSet) -> None:
    """The token ids as `input_ids` (and the window starts) in a safetensors file, written atomically."""
    tensors = {"input_ids": calibration.input_ids}
    if calibration.starts is not None:
        # tensors, not metadata: safetensors writes metadata in hash-map order, which differs between
        # calls, and this file must come out the same bytes every time (resume, tests)
        tensors["starts"] = calibration.starts
        tensors["text_tokens"] = torch.tensor(calibration.text_tokens, dtype=torch.int64)
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def recorded_windows(path: Path, nwindows: int, seqlen: int) -> CalibrationSet:
    """The first nwindows rows of an `input_ids` tensor saved by an earlier run (or by hand)."""
    with safe_open(path, framework="pt") as handle:
        if "input_ids" not in handle.keys():
            raise StreamPruneError(f"{path} has no 'input_ids' tensor")
        ids = handle.get_tensor("input_ids").long()
        recorded = {"starts", "text_tokens"} <= set(handle.keys())
        starts = handle.get_tensor("starts").long() if recorded else None
        text_tokens = int(handle.get_tensor("text_tokens")) if recorded else None
    if ids.ndim != 2 or ids.shape[1] != seqlen or ids.shape[0] < nwindows:
        raise StreamPruneError(
            f"{path} holds input_ids of shape {tuple(ids.shape)}; need at least {nwindows} rows of seqlen {seqlen}"
        )
    if starts is not None and starts.shape != ids.shape[:1]:
        starts = text_tokens = None  # not as save_windows writes them: the overlap is unknown
    return CalibrationSet(ids, starts, text_tokens).head(nwindows)


def calibration_windows(calib: str, tokenizer, nwindows: int, seqlen: int, seed: int, progress: bool = False) -> CalibrationSet:
    """nwindows windows of seqlen token ids for the calibration forward passes, and how much they overlap.

    Warns (warn_if_overlapping) when a short text makes the windows share many tokens.  Raises
    StreamPruneError for an unknown source, a text without one window's worth of tokens, or no tokenizer.
    """
    path = Path(calib).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        return recorded_windows(path, nwindows, seqlen)
    if path.exists():
        documents = local_documents(path)
    elif calib in HUB_CORPORA:
        documents = hub_documents(calib)
    else:
        raise StreamPruneError(
            f"calibration source {calib!r} is neither a file nor a folder, nor one of {', '.join(HUB_CORPORA)}"
        )
    if tokenizer is None:
        raise StreamPruneError("the model has no tokenizer files; pass token ids with --calib IDS.safetensors")
    stream = token_stream(tokenizer, documents, nwindows * seqlen, seed, progress)
    calibration = draw_windows(stream, nwindows, seqlen, seed)
    warn_if_overlapping(calibration)
    return calibration
