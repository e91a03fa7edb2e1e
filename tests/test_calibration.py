"""Calibration sources and seeded window sampling."""

import json

import pytest
import torch
from make_checkpoint import byte_level_tokenizer
from safetensors.torch import save_file

from streamprune.calibration import calibration_windows, draw_windows, split_pieces
from streamprune.data import WIKITEXT_CALIBRATION
from streamprune.errors import StreamPruneError


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def test_windows_are_seeded_slices_of_the_text(tokenizer):
    text = WIKITEXT_CALIBRATION.read_text()
    a = calibration_windows(str(WIKITEXT_CALIBRATION), tokenizer, 6, 40, seed=1)
    b = calibration_windows(str(WIKITEXT_CALIBRATION), tokenizer, 6, 40, seed=1)
    c = calibration_windows(str(WIKITEXT_CALIBRATION), tokenizer, 6, 40, seed=2)
    assert a.shape == (6, 40) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    for row in a:
        assert tokenizer.decode(row) in text  # a byte-level window is a substring of the corpus


def test_jsonl_folder_and_text_sources(tokenizer, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.jsonl").write_text("\n".join(json.dumps({"text": f"document {i} " * 20}) for i in range(5)))
    (tmp_path / "docs" / "b.txt").write_text("plain text file " * 30)
    (tmp_path / "docs" / "ignored.csv").write_text("x,y\n" * 1000)
    ids = calibration_windows(str(tmp_path / "docs"), tokenizer, 4, 16, seed=0)
    decoded = [tokenizer.decode(row) for row in ids]
    assert all("," not in text for text in decoded)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "no text field"}\n')
    with pytest.raises(StreamPruneError, match="line 1 .* 'text' field"):
        calibration_windows(str(bad), tokenizer, 1, 4, seed=0)


def test_recorded_ids_are_reused_exactly(tmp_path):
    ids = torch.randint(0, 256, (5, 12))
    save_file({"input_ids": ids}, tmp_path / "ids.safetensors")
    assert torch.equal(calibration_windows(str(tmp_path / "ids.safetensors"), None, 3, 12, seed=9), ids[:3])
    with pytest.raises(StreamPruneError, match="need at least 6 rows of seqlen 12"):
        calibration_windows(str(tmp_path / "ids.safetensors"), None, 6, 12, seed=0)


def test_too_little_text_and_no_tokenizer_are_errors(tokenizer, tmp_path):
    with pytest.raises(StreamPruneError, match="5 tokens, fewer than one window of seqlen 6"):
        draw_windows(torch.arange(5), 1, 6, seed=0)
    assert draw_windows(torch.arange(6), 3, 6, seed=0).tolist() == [list(range(6))] * 3
    with pytest.raises(StreamPruneError, match="no tokenizer"):
        calibration_windows(str(WIKITEXT_CALIBRATION), None, 1, 8, seed=0)


def test_pieces_are_cut_at_line_breaks():
    document = "".join(f"line {i}\n" for i in range(100))
    pieces = split_pieces([document], piece_chars=50)
    assert "".join(pieces) == document
    assert all(len(p) <= 50 and p.endswith("\n") for p in pieces)
