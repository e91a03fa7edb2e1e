#!/usr/bin/env python3
"""Streamed greedy generation with its key/value caches kept in memory against parked in files.

On a random checkpoint with LLaMA-2-7B's block shape (hidden 4096, MLP 11008, 32 heads, vocab 32000,
bfloat16; 4 blocks by default), CPU, the same requests (random token contexts) decoded by
streamprune.evaluate.generation.generate in a fresh child process each:
  memory  the default budget: caches and the contexts' hidden states stay in (host) memory
  disk    --offload disk: every cache entry waits in a file between block visits
  cramped the default placement (auto) under a host-memory limit below the caches' size
It prints peak RSS, wall time, the bytes the process handed to write() (/proc/self/io's wchar: the parked
caches' files, a few KB of output; reads are not counted, since the checkpoint and the parked files are
read through memory maps), the caches' size (from the config: keys and values of every block for
every row's context and new tokens), checks that the three runs generate the same tokens, and writes
JSON.  The memory run is the baseline: the disk runs hold less host memory (the caches, less what the
reading of each visit's entry costs) and should write the caches about once.

  python benchmarks/generation_cache.py --workdir /tmp/gencache --json benchmarks/results/generation_cache_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from child import ROOT, run_script

sys.path.insert(0, str(ROOT / "tools"))

GIB = 2**30

RUN = r"""
import json, sys, time
import torch
from streamprune.evaluate.generation import generate
from streamprune.loading import open_model
from streamprune.placement import Budget
kind, model_dir, requests, context, new, workdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
budget = {"memory": Budget(), "disk": Budget(offload="disk", offload_dir=workdir),
          "cramped": Budget(max_cpu_bytes=int(sys.argv[7]), offload_dir=workdir)}[kind]
generator = torch.Generator().manual_seed(0)
contexts = [torch.randint(0, 32000, (context - 7 * (i % 4),), generator=generator).tolist() for i in range(requests)]
started = time.perf_counter()
stack = open_model(model_dir, device="cpu", dtype="bfloat16", budget=budget).stack
tokens = generate(stack, contexts, new, batch_size=4)
from streamprune.state import peak_rss_bytes
try:  # bytes handed to write() calls by this process (Linux), files and pipes alike
    io = {k: int(v) for k, v in (line.split(": ") for line in open("/proc/self/io").read().splitlines())}
except OSError:
    io = {}
print(json.dumps({"wall_s": time.perf_counter() - started, "peak_rss_bytes": peak_rss_bytes(),
                  "written_bytes": io.get("wchar"), "tokens": tokens}))
"""


def main() -> int:
    from make_checkpoint import PRESETS, make_random_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--context", type=int, default=512, help="tokens of the longest context")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    shape = PRESETS["llama2-7b"]
    model_dir = args.workdir / f"llama7b-shape-{args.layers}"
    if not (model_dir / "config.json").exists():
        make_random_checkpoint(model_dir, layers=args.layers, dtype="bfloat16", max_shard_bytes=2 * GIB, **shape)
    hidden = shape["hidden"]
    tokens = sum(args.context - 7 * (i % 4) + args.new_tokens for i in range(args.requests))
    cache_bytes = 2 * 2 * hidden * args.layers * tokens  # keys and values, bfloat16, 32 heads of 128
    runs = {}
    for kind in ("memory", "disk", "cramped"):
        runs[kind] = run_script(RUN, kind, model_dir, args.requests, args.context, args.new_tokens, args.workdir, cache_bytes // 2)
        print(f"{kind:8s} {runs[kind]['wall_s']:8.1f} s  {runs[kind]['peak_rss_bytes'] / GIB:6.2f} GiB", flush=True)
    same = all(run["tokens"] == runs["memory"]["tokens"] for run in runs.values())
    base = runs["memory"]
    print(f"\ncaches {cache_bytes / GIB:.2f} GiB ({args.requests} requests, {args.layers} blocks, up to {args.context} + "
          f"{args.new_tokens} tokens, bf16)")
    print(f"{'caches':8s} {'wall s':>8s} {'x memory':>9s} {'peak GiB':>9s} {'saved GiB':>10s} {'written GiB':>12s}")
    gib = lambda n: f"{n / GIB:.2f}" if n is not None else "-"  # noqa: E731
    for kind, run in runs.items():
        print(f"{kind:8s} {run['wall_s']:8.1f} {run['wall_s'] / base['wall_s']:9.2f} {run['peak_rss_bytes'] / GIB:9.2f} "
              f"{(base['peak_rss_bytes'] - run['peak_rss_bytes']) / GIB:10.2f} {gib(run['written_bytes']):>12s}")
    print(f"\nsame tokens in the three runs: {same}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        for run in runs.values():
            run.pop("tokens")
        args.json.write_text(json.dumps({
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "protocol": {"layers": args.layers, "requests": args.requests, "context": args.context,
                         "new_tokens": args.new_tokens, "dtype": "bfloat16", "device": "cpu", "batch_size": 4},
            "cache_bytes": cache_bytes, "runs": runs, "same_tokens": same}, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - started:.0f} s in all)")
    sys.exit(code)
