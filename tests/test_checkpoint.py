"""Reading by block prefix, atomic shards and index, and the input left untouched."""

import hashlib
import json
import stat

import torch
from safetensors import safe_open

import streamprune
from streamprune.checkpoint import CheckpointReader, CheckpointWriter
from streamprune.data import WIKITEXT_CALIBRATION


def test_block_prefix_one_does_not_catch_block_ten(tiny_checkpoint):
    reader = CheckpointReader(tiny_checkpoint("llama", layers=11, hidden=16, intermediate=32, heads=2, kv_heads=1))
    keys = reader.keys_with_prefix("model.layers.1.")
    assert len(keys) == 9 and all(k.startswith("model.layers.1.") for k in keys)
    tensors = reader.read(keys)
    assert tensors["model.layers.1.mlp.up_proj.weight"].shape == (32, 16)
    assert reader.shapes["model.layers.10.mlp.down_proj.weight"] == (16, 32)


def test_writer_index_lists_every_tensor_with_the_total_size(tmp_path):
    writer = CheckpointWriter(tmp_path, total_shards=2)
    writer.write_shard(0, {"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)})
    writer.write_shard(1, {"c": torch.ones(5, dtype=torch.float64)})
    writer.write_index()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }
    assert index["metadata"]["total_size"] == 6 * 4 + 4 * 2 + 5 * 8
    with safe_open(tmp_path / "model-00001-of-00002.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert not list(tmp_path.glob(".*tmp"))
    mode = (tmp_path / "model-00001-of-00002.safetensors").stat().st_mode
    assert mode & stat.S_IRGRP  # readable like any other file, not safetensors' 0600


def test_pruning_never_writes_to_the_input(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen2")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model.iterdir()}
    streamprune.prune(model, tmp_path / "out", calib=str(WIKITEXT_CALIBRATION), nsamples=2, seqlen=16, progress=False)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model.iterdir()}
    assert before == after


def test_a_full_disk_as_safetensors_reports_it_says_free_space_and_rerun(tmp_path):
    import pytest
    from safetensors import SafetensorError

    from streamprune.checkpoint import write_atomic
    from streamprune.errors import StreamPruneError

    def full_disk(tmp):
        tmp.write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(StreamPruneError, match="no space left.*rerun the same command"):
        write_atomic(tmp_path / "shard.safetensors", full_disk)
    assert list(tmp_path.iterdir()) == []
