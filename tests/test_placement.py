"""Where hidden states live never changes a result: device, host memory and disk give the same bits."""

import hashlib
import os
from pathlib import Path

import pytest
import torch

import streamprune
from streamprune.data import WIKITEXT_CALIBRATION
from streamprune.errors import StreamPruneError
from streamprune.evaluate.loglikelihood import Request, streamed_logprobs
from streamprune.loading import open_model
from streamprune.placement import Budget, FileStates, choose_placement, parse_size, pin_host_states, pinned_bytes


def test_sizes_read_like_people_write_them():
    assert parse_size("3GiB") == 3 * 2**30
    assert parse_size("800MB") == 800 * 10**6
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size("4096") == 4096 and parse_size(None) is None
    with pytest.raises(StreamPruneError, match="3GiB"):
        parse_size("lots")


def test_auto_placement_follows_the_budget():
    cpu = torch.device("cpu")
    assert choose_placement(100, 50, cpu, Budget(max_cpu_bytes=200)) == "device"
    assert choose_placement(180, 50, cpu, Budget(max_cpu_bytes=200)) == "disk"
    assert choose_placement(10, 0, cpu, Budget(offload="disk")) == "disk"
    assert choose_placement(10**15, 0, cpu, Budget(offload="cpu")) == "device"  # on a CPU, host memory is the device
    with pytest.raises(StreamPruneError, match="--offload"):
        Budget(offload="ssd")


def test_pinned_host_memory_counts_at_the_size_pytorch_allocates(tiny_checkpoint):
    """On CUDA, host memory holds pinned copies rounded up to a power of two (PyTorch's caching host
    allocator): hidden states go to host memory only beside two pinned blocks, and are pinned only where
    their rounded size fits --max-cpu-memory too; else they stay pageable, at their own size."""
    assert [pinned_bytes(n) for n in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [0, 1, 2, 4, 4, 8, 1024, 1024, 2048]
    assert pinned_bytes(3 * 2**29) == 2**31  # 1.5 GiB of hidden states take 2 GiB pinned
    cuda, budget = torch.device("cuda"), Budget(max_gpu_bytes=100, max_cpu_bytes=1000)  # no GPU is asked: limits given
    assert choose_placement(600, 0, cuda, budget) == choose_placement(600, 0, cuda, budget, 400) == "cpu"
    assert choose_placement(600, 0, cuda, budget, 401) == "disk"
    assert choose_placement(50, 50, cuda, budget, 10**6) == "device"  # on the device, host memory is not used
    assert pin_host_states([500], budget) and not pin_host_states([600], budget)  # 512 fits in 1000, 1024 does not
    assert pin_host_states([500], budget, 488) and not pin_host_states([500], budget, 489)
    assert pin_host_states([300, 200], budget) and not pin_host_states([300, 300], budget)  # each rounded: 768; 1024
    stack = open_model(tiny_checkpoint("llama", dtype="float64", layers=2), device="cpu").stack
    assert stack.host_reserve_bytes() == 0 and not stack.pins([1])  # on a CPU the device's reserve holds the blocks
    stored = [8 * torch.Size(stack.reader.shapes[k]).numel() for k in stack.block_keys(0)]
    assert sorted(set(stored)) == [512, 16384, 32768, 81920]  # norms (64), keys and values (32 x 64), q/o (64 x 64), MLP (160 x 64)
    stack.device = cuda  # what a CUDA stack reserves, computed without one
    reserve = 2 * sum({81920: 131072}.get(n, n) for n in stored)
    assert stack.host_reserve_bytes() == reserve
    stack.budget = Budget(max_gpu_bytes=1, max_cpu_bytes=reserve + 2**20)
    assert stack.pins([2**19, 2**19]) and not stack.pins([2**19, 2**19 + 1])  # 2 x 512 KiB fit; 512 KiB + 1 MiB do not


def test_file_states_round_trip_any_dtype(tmp_path):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        states = FileStates((5, 3, 4), dtype, tmp_path, torch.device("cpu"))
        values = torch.randn(5, 3, 4).to(dtype)
        states.write(0, values[:2])
        states.write(2, values[2:])
        assert torch.equal(states.read(1, 4), values[1:4])
        path = states.path
        states.close()
        assert not path.exists()


class _ShortTransfers:
    """An unbuffered file whose reads and writes move at most 7 bytes a call, as Linux's read(2) and
    write(2) move at most 2 GiB - 4 KiB (a batch of 7B-model hidden states can be more)."""

    def __init__(self, file):
        self.file = file

    def readinto(self, buffer):
        return self.file.readinto(memoryview(buffer).cast("B")[:7])

    def write(self, data):
        return self.file.write(memoryview(data).cast("B")[:7])

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_file_states_move_every_byte_when_the_system_moves_fewer_a_call(tmp_path):
    states = FileStates((4, 3, 5), torch.float32, tmp_path, torch.device("cpu"))
    states.file = _ShortTransfers(states.file)
    values = torch.randn(4, 3, 5)
    states.write(0, values)
    assert states.path.read_bytes() == values.numpy().tobytes()
    assert torch.equal(states.read(1, 4), values[1:4])
    os.truncate(states.path, 2 * states.row_bytes)
    with pytest.raises(StreamPruneError, match="ended early"):
        states.read(1, 4)
    states.close()


def hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.is_file() and p.name != "streamprune.json"}


def test_pruning_gives_the_same_bits_with_hidden_states_on_disk(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("mistral", dtype="float32")
    options = dict(calib=str(WIKITEXT_CALIBRATION), nsamples=5, seqlen=24, batch_size=2, progress=False)
    in_memory = streamprune.prune(model, tmp_path / "memory", **options)
    on_disk = streamprune.prune(model, tmp_path / "disk", budget=Budget(offload="disk"), **options)
    assert in_memory.placement == "device" and on_disk.placement == "disk"
    assert hashes(tmp_path / "memory") == hashes(tmp_path / "disk")
    assert not list((tmp_path / "disk").glob(".hidden-states-*"))
    squeezed = streamprune.prune(model, tmp_path / "auto", budget=Budget(max_cpu_bytes=1000), **options)
    assert squeezed.placement == "disk" and hashes(tmp_path / "auto") == hashes(tmp_path / "memory")


def test_background_reads_and_writes_give_the_same_bits(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("qwen3", dtype="bfloat16")
    options = dict(calib=str(WIKITEXT_CALIBRATION), nsamples=4, seqlen=16, batch_size=3, progress=False)
    streamprune.prune(model, tmp_path / "inline", overlap=False, **options)
    streamprune.prune(model, tmp_path / "overlap", overlap=True, **options)
    assert hashes(tmp_path / "inline") == hashes(tmp_path / "overlap")


def test_scoring_gives_the_same_numbers_with_hidden_states_on_disk(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama")
    requests = [Request(tuple(range(1, n)), start=n // 2) for n in (9, 17, 30)]
    in_memory = streamed_logprobs(open_model(model, device="cpu").stack, requests, batch_size=2)
    disk_stack = open_model(model, device="cpu", budget=Budget(offload="disk", offload_dir=str(tmp_path))).stack
    on_disk = streamed_logprobs(disk_stack, requests, batch_size=2)
    assert all(torch.equal(a, b) for a, b in zip(in_memory, on_disk))
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resetting the peak needs Linux")
def test_each_run_reports_its_own_peak_not_the_process_largest():
    from streamprune.state import peak_rss_bytes, reset_peak_memory

    big = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    high = peak_rss_bytes()
    del big
    reset_peak_memory(torch.device("cpu"))
    assert peak_rss_bytes() < high - 128 * 2**20


def test_evaluation_places_a_whole_round_of_hidden_states_against_the_limit(tiny_checkpoint, tmp_path, monkeypatch):
    import streamprune.blocks

    model = tiny_checkpoint("llama")  # float64, hidden size 64
    requests = [Request(tuple(range(first, first + 16)), start=1) for first in range(1, 7)]  # 6 rows of 15 inputs
    reference = streamed_logprobs(open_model(model, device="cpu").stack, requests, batch_size=2)
    stack = open_model(model, device="cpu").stack
    batch_bytes = 2 * 16 * 64 * 8  # one batch: 2 rows padded to 16 positions, float64
    reserve = 2 * 8 * sum(torch.Size(stack.reader.shapes[k]).numel() for k in stack.block_keys(0))
    reserve += 8 * 2 * 16 * (4 * 64 + 3 * 160)
    asked = []
    real = streamprune.blocks.choose_placement
    monkeypatch.setattr(streamprune.blocks, "choose_placement", lambda n, r, d, b, h: asked.append((n, r, h)) or real(n, r, d, b, h))
    # room for two batches beside a block at work, not for the round of three: the whole round goes to disk
    stack.budget = Budget(max_cpu_bytes=reserve + 2 * batch_bytes, offload_dir=str(tmp_path))
    made = []
    monkeypatch.setattr(streamprune.blocks, "make_states", lambda *a, **k: made.append(a[3]) or streamprune.placement.make_states(*a, **k))
    on_disk = streamed_logprobs(stack, requests, batch_size=2)
    assert asked == [(3 * batch_bytes, reserve, 0)]  # one decision, for all that is resident at once (no pinned blocks on a CPU)
    assert made == ["disk"] * 3
    assert all(torch.equal(a, b) for a, b in zip(reference, on_disk))
    made.clear()
    stack.budget = Budget(max_cpu_bytes=reserve + 3 * batch_bytes)
    streamed_logprobs(stack, requests, batch_size=2)
    assert made == ["device"] * 3


def test_the_gram_matrices_count_against_the_memory_limit(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama")  # float64: hidden 64, MLP 160
    stack = open_model(model, device="cpu").stack
    hidden_bytes = 4 * 16 * 64 * 8  # 4 windows of 16 tokens
    reserve = 2 * 8 * sum(torch.Size(stack.reader.shapes[k]).numel() for k in stack.block_keys(0)) + 8 * 2 * 16 * (4 * 64 + 3 * 160)
    grams = 8 * (6 * 64 * 64 + 160 * 160)  # one per linear, an upper bound: q, k, v, o, gate, up take 64 inputs
    budget = Budget(max_cpu_bytes=hidden_bytes + reserve + grams // 2)
    common = dict(calib=str(WIKITEXT_CALIBRATION), nsamples=4, seqlen=16, batch_size=2, device="cpu", progress=False, budget=budget)
    assert streamprune.prune(model, tmp_path / "wanda", method="wanda", **common).placement == "device"
    assert streamprune.prune(model, tmp_path / "sparsegpt", method="sparsegpt", **common).placement == "disk"
