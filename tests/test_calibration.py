"""Calibration sources and seeded window sampling."""

import json

import pytest
import torch
from make_checkpoint import byte_level_tokenizer
from safetensors.torch import save_file

from streamprune.calibration import (
    CalibrationSet, calibration_windows, draw_windows, local_documents, recorded_windows, save_windows, split_pieces,
)
from streamprune.data import WIKITEXT_CALIBRATION
from streamprune.errors import StreamPruneError


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def test_windows_are_seeded_slices_of_the_text(tokenizer):
    text = WIKITEXT_CALIBRATION.read_text()
    a = calibration_windows(str(WIKITEXT_CALIBRATION), tokenizer, 6, 40, seed=1).input_ids
    b = calibration_windows(str(WIKITEXT_CALIBRATION), tokenizer, 6, 40, seed=1).input_ids
    c = calibration_windows(str(WIKITEXT_CALIBRATION), tokenizer, 6, 40, seed=2).input_ids
    assert a.shape == (6, 40) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    for row in a:
        assert tokenizer.decode(row) in text  # a byte-level window is a substring of the corpus


def test_jsonl_folder_and_text_sources(tokenizer, tmp_path):
    (tmp_path / "docs").mkdir()
    texts = [f"document {i} " * 20 for i in range(5)]
    (tmp_path / "docs" / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    (tmp_path / "docs" / "b.txt").write_text("plain text file " * 30)
    (tmp_path / "docs" / "ignored.csv").write_text("x,y\n" * 1000)
    documents = texts + ["plain text file " * 30]
    assert local_documents(tmp_path / "docs") == documents  # the text fields, then the text file; no csv
    # 30 x 16 tokens asks for a pool larger than the 1580 bytes of text: every document is tokenized
    windows = [tokenizer.decode(row) for row in calibration_windows(str(tmp_path / "docs"), tokenizer, 30, 16, seed=0).input_ids]
    # each window lies within one document or across the joint of two (pieces are concatenated)
    assert all(any(w in a + b for a in documents for b in documents) for w in windows), windows
    assert any("document" in w for w in windows) and any("plain text" in w for w in windows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "no text field"}\n')
    with pytest.raises(StreamPruneError, match="line 1 .* 'text' field"):
        calibration_windows(str(bad), tokenizer, 1, 4, seed=0)


def test_distinct_tokens_are_the_positions_the_windows_cover():
    windows = CalibrationSet(torch.zeros(4, 10, dtype=torch.long), torch.tensor([100, 5, 0, 103]), text_tokens=200)
    # [0, 10) + [5, 15) + [100, 110) + [103, 113): 15 + 13 covered positions (not 40, not the distinct token ids)
    assert windows.distinct_tokens == 28
    assert windows.summary() == {"windows": 4, "seqlen": 10, "tokens": 40, "distinct_tokens": 28, "text_tokens": 200}
    assert CalibrationSet(torch.zeros(2, 10, dtype=torch.long)).distinct_tokens is None


def test_a_short_text_warns_with_both_numbers_and_a_large_one_does_not(tokenizer, tmp_path, caplog):
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 300)  # 3,000 byte tokens
    with caplog.at_level("WARNING", logger="streamprune"):
        windows = calibration_windows(str(short), tokenizer, 16, 512, seed=0)
    assert windows.text_tokens == 3000 and windows.distinct_tokens <= 3000
    share = round(100 * (1 - windows.distinct_tokens / 8192))
    assert [r.getMessage() for r in caplog.records] == [
        f"the calibration text has only 3,000 tokens: the 16 windows of 512 tokens (8,192 tokens) cover "
        f"{windows.distinct_tokens:,} distinct tokens, so {share}% of the calibration tokens repeat others; "
        "give more text, or fewer or shorter windows"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="streamprune"):
        windows = calibration_windows(str(WIKITEXT_CALIBRATION), tokenizer, 4, 64, seed=0)
    assert windows.text_tokens >= 4 * 256 and not caplog.records


def test_window_starts_survive_the_ids_file(tokenizer, tmp_path):
    drawn = calibration_windows(str(WIKITEXT_CALIBRATION), tokenizer, 5, 32, seed=3)
    save_windows(tmp_path / "ids.safetensors", drawn)
    again = recorded_windows(tmp_path / "ids.safetensors", 3, 32)
    assert torch.equal(again.input_ids, drawn.input_ids[:3]) and torch.equal(again.starts, drawn.starts[:3])
    assert again.text_tokens == drawn.text_tokens
    assert again.distinct_tokens == CalibrationSet(drawn.input_ids[:3], drawn.starts[:3]).distinct_tokens


def test_recorded_ids_are_reused_exactly(tmp_path):
    ids = torch.randint(0, 256, (5, 12))
    save_file({"input_ids": ids}, tmp_path / "ids.safetensors")
    reused = calibration_windows(str(tmp_path / "ids.safetensors"), None, 3, 12, seed=9)
    assert torch.equal(reused.input_ids, ids[:3]) and reused.distinct_tokens is None  # ids by hand: no starts
    with pytest.raises(StreamPruneError, match="need at least 6 rows of seqlen 12"):
        calibration_windows(str(tmp_path / "ids.safetensors"), None, 6, 12, seed=0)


def test_too_little_text_and_no_tokenizer_are_errors(tokenizer, tmp_path):
    with pytest.raises(StreamPruneError, match="5 tokens, fewer than one window of seqlen 6"):
        draw_windows(torch.arange(5), 1, 6, seed=0)
    assert draw_windows(torch.arange(6), 3, 6, seed=0).input_ids.tolist() == [list(range(6))] * 3
    with pytest.raises(StreamPruneError, match="no tokenizer"):
        calibration_windows(str(WIKITEXT_CALIBRATION), None, 1, 8, seed=0)


def test_pieces_are_cut_at_line_breaks():
    document = "".join(f"line {i}\n" for i in range(100))
    pieces = split_pieces([document], piece_chars=50)
    assert "".join(pieces) == document
    assert all(len(p) <= 50 and p.endswith("\n") for p in pieces)
