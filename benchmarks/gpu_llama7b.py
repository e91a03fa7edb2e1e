#!/usr/bin/env python3
"""GPU benchmark: prune a full LLaMA-2-7B-shaped random checkpoint with 128 x 2048 calibration tokens.

One run, for a CUDA machine (it also runs on a CPU with small shapes, to check the script):
  1. write a random-weight checkpoint with LLaMA-2-7B's shapes (32 blocks, hidden 4096, MLP 11008,
     32 heads, vocab 32000, float16) with tools/make_checkpoint.py, drawing the numbers on the GPU;
  2. prune it with `streamprune prune` in a child process (EN-Modified, a = 0.5, 50%) on seeded random
     token ids, so the child's peak host RSS and GPU memory are the pruning's alone: once with the
     hidden states on the GPU, once with --max-gpu-memory 3GiB (they go to pinned host memory); then
     with SparseGPT under --max-gpu-memory 4GiB (its Gram matrices take about 0.7 GB per block);
  3. measure a floor for the same work: two forward passes of one block over all calibration tokens
     (times the number of blocks), plus reading and writing the checkpoint's bytes at the disk's speed;
  4. print a table and write JSON.

  python benchmarks/gpu_llama7b.py --workdir /tmp/bench --json results.json
  python benchmarks/gpu_llama7b.py --workdir /tmp/bench --small   # a quick check of the script itself
  python benchmarks/gpu_llama7b.py --workdir /tmp/bench --layers 8 --variants sparsegpt   # one variant, 8 blocks
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

from make_checkpoint import PRESETS, make_random_checkpoint  # noqa: E402

from streamprune.loading import open_model  # noqa: E402

GIB = 2**30


def disk_throughput(directory: Path, nbytes: int) -> dict:
    """Sequential write (with fsync) then read of nbytes, in bytes per second."""
    path = directory / "throughput.bin"
    block = os.urandom(64 * 2**20)
    started = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(max(1, nbytes // len(block))):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    written = path.stat().st_size
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    with open(path, "rb") as handle:
        while handle.read(64 * 2**20):
            pass
    read_s = time.perf_counter() - started
    path.unlink()
    return {"write_Bps": written / write_s, "read_Bps": written / read_s, "bytes": written}


def forward_floor(model_dir: Path, ids: torch.Tensor, device: str, batch_size: int) -> dict:
    """Seconds for two plain forward passes of block 0 over all calibration windows (no hooks, no I/O)."""
    stack = open_model(model_dir, device=device).stack
    acts = stack.embed(ids, batch_size)
    stack.load_block(0)
    stack.run_block(0, stack.embed(ids[:batch_size], batch_size), batch_size, write_back=False)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(2):
        stack.run_block(0, acts, batch_size, write_back=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"two_passes_one_block_s": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=None, help="comma-separated words: run only the variants whose names hold one")
    parser.add_argument("--small", action="store_true", help="tiny shapes: check the script, not the machine")
    args = parser.parse_args()

    shape = dict(PRESETS["tiny" if args.small else "llama2-7b"])
    if args.small:
        args.layers, args.nsamples, args.seqlen = 2, 4, 64
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir, out_dir = args.workdir / "llama7b-shape", args.workdir / "pruned"
    results: dict = {
        "machine": {
            "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
        },
        "shape": {**shape, "layers": args.layers, "dtype": "float16"},
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size},
    }

    def save_results():
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")

    started = time.perf_counter()
    if not (model_dir / "model.safetensors.index.json").exists():
        make_random_checkpoint(
            model_dir, layers=args.layers, dtype="float16", max_shard_bytes=2 * GIB,
            device=args.device if args.device.startswith("cuda") else "cpu", **shape,
        )
    checkpoint_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    results["checkpoint"] = {"bytes": checkpoint_bytes, "generate_s": round(time.perf_counter() - started, 1)}
    save_results()
    print(f"checkpoint: {checkpoint_bytes / GIB:.2f} GiB in {results['checkpoint']['generate_s']} s", flush=True)

    ids = torch.randint(0, shape["vocab"], (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    ids_file = args.workdir / "ids.safetensors"
    save_file({"input_ids": ids}, ids_file)

    results["prune"] = {}
    en_modified = ["--method", "en-modified", "--alpha", "0.5"]
    variants = (
        ("hidden on GPU", en_modified + ["--offload", "device"]),
        ("GPU budget 3GiB", en_modified + ["--max-gpu-memory", "3GiB"]),
        ("sparsegpt, GPU budget 4GiB", ["--method", "sparsegpt", "--max-gpu-memory", "4GiB"]),
    )
    if args.variants:
        words = args.variants.split(",")
        variants = tuple(v for v in variants if any(word in v[0] for word in words))
    for variant, extra in variants:
        command = [
            sys.executable, "-m", "streamprune.cli", "prune", str(model_dir), str(out_dir), "--overwrite",
            "--sparsity", "0.5", "--calib", str(ids_file),
            "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size),
            "--device", args.device, *extra,
        ]
        started = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.perf_counter() - started
        manifest = json.loads((out_dir / "streamprune.json").read_text())
        results["prune"][variant] = {
            "wall_s": round(wall, 1),
            "total_s": manifest["timings"]["total_s"],
            "calibration_s": manifest["timings"]["calibration_s"],
            "block_s_mean": round(sum(manifest["timings"]["blocks_s"]) / len(manifest["timings"]["blocks_s"]), 3),
            "placement": manifest["placement"],
            "peak_memory": manifest["peak_memory"],
            "status": manifest["status"],
        }
        save_results()

    disk = disk_throughput(args.workdir, min(checkpoint_bytes, 4 * GIB))
    floor = forward_floor(model_dir, ids, args.device, args.batch_size)
    floor_s = (
        floor["two_passes_one_block_s"] * args.layers
        + checkpoint_bytes / disk["read_Bps"]
        + checkpoint_bytes / disk["write_Bps"]
    )
    results["floor"] = {**floor, "disk": disk, "floor_s": round(floor_s, 1)}
    save_results()

    rows = [
        ("checkpoint", f"{checkpoint_bytes / GIB:.2f} GiB, {args.layers} blocks"),
        ("calibration", f"{args.nsamples} x {args.seqlen} tokens, batch {args.batch_size}"),
        ("compute+disk floor", f"{floor_s:.1f} s  (2 passes x {args.layers} blocks {floor['two_passes_one_block_s'] * args.layers:.1f} s, "
                               f"disk read {disk['read_Bps'] / GIB:.2f} GiB/s, write {disk['write_Bps'] / GIB:.2f} GiB/s)"),
    ]
    for variant, run in results["prune"].items():
        peak = run["peak_memory"]
        run["ratio_to_floor"] = round(run["total_s"] / floor_s, 2)
        rows.append((variant, f"{run['total_s']:.1f} s = {run['ratio_to_floor']:.2f}x floor ({run['block_s_mean']:.2f} s/block), "
                              f"hidden on {run['placement']}, peak host RSS {peak['host_rss_bytes'] / GIB:.2f} GiB"
                              + (f", GPU allocated {peak['gpu_allocated_bytes'] / GIB:.2f} / reserved "
                                 f"{peak['gpu_reserved_bytes'] / GIB:.2f} GiB" if "gpu_allocated_bytes" in peak else "")))
    save_results()
    width = max(len(r[0]) for r in rows)
    print(f"\n{results['machine']['device']}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
