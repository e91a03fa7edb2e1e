"""Calibration corpus -> seeded windows of token ids.

Sources: `wikitext103` and `c4` from the Hugging Face hub (datasets), or a local path: a plain text or
`.raw` file (one document), a `.jsonl` file (one document per line, field `text`), a folder of such
files, or a `.safetensors` file holding an `input_ids` tensor recorded by an earlier run.

Sampling: documents are cut at line breaks into pieces of at most PIECE_CHARS characters; the pieces
are visited in a seeded random order and tokenized (no special tokens) into one stream until it holds
POOL_FACTOR times the tokens the windows need, or the corpus ends.  Window starts are then drawn
uniformly at random (seeded) from that stream; windows may overlap, as in the reference Wanda code.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .checkpoint import write_atomic
from .errors import StreamPruneError

PIECE_CHARS = 100_000
POOL_FACTOR = 4
TEXT_SUFFIXES = (".txt", ".raw", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")


HUB_CORPORA = ("wikitext103", "c4")


def hub_documents(name: str) -> list[str]:
    """The named corpus from the Hugging Face hub (needs the network, or the datasets cache)."""
    import datasets

    try:
        if name == "wikitext103":
            rows = datasets.load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1", split="train")
            return ["".join(rows["text"])]  # the rows are the lines of the raw file, in order
        rows = datasets.load_dataset(
            "allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"
        )
        return list(rows["text"])
    except Exception as exc:
        raise StreamPruneError(
            f"could not load calibration corpus {name!r} from the hub ({type(exc).__name__}); "
            "offline, pass a local text or .jsonl file with --calib"
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
    with tqdm(total=target, desc="Tokenizing calibration text", unit="tok", disable=not progress, leave=False) as bar:
        for piece in pieces:
            new = tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
            ids.extend(new)
            bar.update(min(len(new), max(0, target - bar.n)))
            if len(ids) >= target:
                break
    return torch.tensor(ids, dtype=torch.long)


def draw_windows(stream: torch.Tensor, nwindows: int, seqlen: int, seed: int) -> torch.Tensor:
    """nwindows windows of seqlen consecutive tokens at seeded uniform random starts."""
    if stream.numel() < seqlen:
        raise StreamPruneError(
            f"the calibration text has {stream.numel()} tokens, fewer than one window of seqlen {seqlen}; "
            "give more text or a smaller --seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (nwindows,), generator=generator)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def save_windows(path: Path, input_ids: torch.Tensor) -> None:
    """The token ids as `input_ids` in a safetensors file, written atomically (recorded_windows reads it)."""
    write_atomic(path, lambda tmp: save_file({"input_ids": input_ids}, tmp, metadata={"format": "pt"}))


def recorded_windows(path: Path, nwindows: int, seqlen: int) -> torch.Tensor:
    """The first nwindows rows of an `input_ids` tensor saved by an earlier run (or by hand)."""
    with safe_open(path, framework="pt") as handle:
        if "input_ids" not in handle.keys():
            raise StreamPruneError(f"{path} has no 'input_ids' tensor")
        ids = handle.get_tensor("input_ids").long()
    if ids.ndim != 2 or ids.shape[1] != seqlen or ids.shape[0] < nwindows:
        raise StreamPruneError(
            f"{path} holds input_ids of shape {tuple(ids.shape)}; need at least {nwindows} rows of seqlen {seqlen}"
        )
    return ids[:nwindows].contiguous()


def calibration_windows(calib: str, tokenizer, nwindows: int, seqlen: int, seed: int, progress: bool = False) -> torch.Tensor:
    """Token ids of shape (nwindows, seqlen) for the calibration forward passes."""
    path = Path(calib).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        return recorded_windows(path, nwindows, seqlen)
    if path.exists():
        documents = local_documents(path)
    elif calib in HUB_CORPORA:
        documents = hub_documents(calib)
    else:
        raise StreamPruneError(
            f"calibration source {calib!r} is neither a file or folder nor one of {', '.join(HUB_CORPORA)}"
        )
    if tokenizer is None:
        raise StreamPruneError("the model has no tokenizer files; pass token ids with --calib IDS.safetensors")
    stream = token_stream(tokenizer, documents, nwindows * seqlen, seed, progress)
    return draw_windows(stream, nwindows, seqlen, seed)
