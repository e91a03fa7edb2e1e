#!/usr/bin/env python3
"""Peak host memory of streamed evaluation against the whole-model way, on LLaMA-2-7B-shaped blocks.

For random-weight checkpoints with LLaMA-2-7B's block shape (hidden 4096, MLP 11008, 32 heads, vocab
32000, bfloat16) and 2 and 4 blocks, each in a fresh child process so peaks do not mix:
  streamed  `streamprune eval CKPT --ppl TEXT` (one block resident; hidden states of all windows)
  whole     transformers' AutoModelForCausalLM loaded whole, the same windows, the model's own loss
It prints peak RSS, wall time and perplexity of each, the sizes they should be compared with (one
block, the embedding, the hidden states), and writes JSON.  With --harness N, each depth also runs an
lm-eval task (tests/data/lmeval's HellaSwag, its first N questions) through lm_eval.simple_evaluate with
StreamedLM and with lm-eval's HF backend (the whole model), each in a fresh process.

  python benchmarks/eval_memory.py --workdir /tmp/evalmem --json benchmarks/results/eval_memory_cpu.json
  python benchmarks/eval_memory.py --workdir /tmp/evalmem --harness 20 --json benchmarks/results/eval_memory_harness_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from child import ROOT, run_script

sys.path.insert(0, str(ROOT / "tools"))

GIB = 2**30

WHOLE_MODEL = r"""
import json, math, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, text_file, seqlen, windows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
started = time.perf_counter()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
ids = tokenizer(open(text_file, encoding="utf-8").read(), return_tensors="pt").input_ids[0]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
losses = []
with torch.no_grad():
    for i in range(windows):
        window = ids[i * seqlen:(i + 1) * seqlen][None]
        losses.append(model(input_ids=window, labels=window).loss.double().item())
from streamprune.state import peak_rss_bytes
print(json.dumps({"ppl": math.exp(sum(losses) / len(losses)), "wall_s": time.perf_counter() - started,
                  "peak_rss_bytes": peak_rss_bytes()}))
"""


def run_streamed(model_dir: Path, text: Path, seqlen: int, windows: int, out: Path) -> dict:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "streamprune.cli", "eval", str(model_dir), "--ppl", str(text), "--seqlen", str(seqlen),
         "--max-windows", str(windows), "--device", "cpu", "--dtype", "bfloat16", "--batch-size", "4",
         "--json", str(out), "--quiet"],
        check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
    )
    results = json.loads(out.read_text())
    return {"ppl": results["ppl"]["value"], "wall_s": time.perf_counter() - started,
            "peak_rss_bytes": results["peak_memory"]["host_rss_bytes"]}


def run_whole(model_dir: Path, text: Path, seqlen: int, windows: int) -> dict:
    return run_script(WHOLE_MODEL, model_dir, text, seqlen, windows)


HARNESS = r"""
import json, os, sys, time
kind, model_dir, root, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
os.chdir(root)  # the task YAMLs name their data from the repository root
started = time.perf_counter()
import lm_eval
from lm_eval.tasks import TaskManager
if kind == "hf":
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=model_dir, device="cpu", dtype="bfloat16", batch_size=4)
else:
    from streamprune.evaluate.harness import StreamedLM
    lm = StreamedLM(pretrained=model_dir, device="cpu", dtype="bfloat16", batch_size=4, progress=False)
out = lm_eval.simple_evaluate(model=lm, tasks=["sp_hellaswag"], task_manager=TaskManager(include_path="tests/data/lmeval"),
                              limit=limit, bootstrap_iters=0)
from streamprune.state import peak_rss_bytes
print(json.dumps({"acc_norm": out["results"]["sp_hellaswag"]["acc_norm,none"], "wall_s": time.perf_counter() - started,
                  "peak_rss_bytes": peak_rss_bytes()}))
"""


def main() -> int:
    from make_checkpoint import PRESETS, make_random_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--layers", default="2,4")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--harness", type=int, default=0, help="also N HellaSwag questions through lm-eval, both backends")
    args = parser.parse_args()
    text = ROOT / "streamprune" / "data" / "wikitext2_valid_slice.raw"
    shape = PRESETS["llama2-7b"]
    rows = []
    for layers in (int(n) for n in args.layers.split(",")):
        model_dir = args.workdir / f"llama7b-shape-{layers}"
        if not (model_dir / "config.json").exists():
            make_random_checkpoint(model_dir, layers=layers, dtype="bfloat16", max_shard_bytes=2 * GIB, **shape)
        streamed = run_streamed(model_dir, text, args.seqlen, args.windows, args.workdir / f"eval-{layers}.json")
        whole = run_whole(model_dir, text, args.seqlen, args.windows)
        row = {"layers": layers, "streamed": streamed, "whole": whole,
               "checkpoint_bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))}
        if args.harness:
            row["harness"] = {kind: run_script(HARNESS, kind, model_dir, ROOT, args.harness) for kind in ("streamed", "hf")}
        rows.append(row)
    hidden = shape["hidden"]
    sizes = {
        "block_bytes": 2 * (4 * hidden * hidden + 3 * hidden * shape["intermediate"]),
        "embedding_bytes": 2 * shape["vocab"] * hidden,
        "hidden_states_bytes": 2 * args.windows * args.seqlen * hidden,
    }
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "protocol": {"seqlen": args.seqlen, "windows": args.windows, "dtype": "bfloat16", "device": "cpu"},
        "sizes": sizes,
        "rows": rows,
    }
    print(f"one block {sizes['block_bytes'] / GIB:.2f} GiB, embedding {sizes['embedding_bytes'] / GIB:.2f} GiB, "
          f"hidden states {sizes['hidden_states_bytes'] / GIB:.3f} GiB ({args.windows} x {args.seqlen}, bf16)")
    print(f"{'blocks':>6} {'checkpoint':>11} {'streamed RSS':>13} {'whole RSS':>10} {'ratio':>6} "
          f"{'streamed s':>11} {'whole s':>8} {'ppl streamed':>13} {'ppl whole':>10}")
    for row in rows:
        s, w = row["streamed"], row["whole"]
        print(f"{row['layers']:>6} {row['checkpoint_bytes'] / GIB:>9.2f}Gi {s['peak_rss_bytes'] / GIB:>11.2f}Gi "
              f"{w['peak_rss_bytes'] / GIB:>8.2f}Gi {s['peak_rss_bytes'] / w['peak_rss_bytes']:>6.2f} "
              f"{s['wall_s']:>11.1f} {w['wall_s']:>8.1f} {s['ppl']:>13.4f} {w['ppl']:>10.4f}")
    if args.harness:
        print(f"\nlm-eval, {args.harness} HellaSwag questions:")
        print(f"{'blocks':>6} {'StreamedLM RSS':>15} {'HF RSS':>8} {'ratio':>6} {'StreamedLM s':>13} {'HF s':>6} {'acc_norm':>15}")
        for row in rows:
            s_, h = row["harness"]["streamed"], row["harness"]["hf"]
            print(f"{row['layers']:>6} {s_['peak_rss_bytes'] / GIB:>13.2f}Gi {h['peak_rss_bytes'] / GIB:>6.2f}Gi "
                  f"{s_['peak_rss_bytes'] / h['peak_rss_bytes']:>6.2f} {s_['wall_s']:>13.1f} {h['wall_s']:>6.1f} "
                  f"{s_['acc_norm']:>7.3f}/{h['acc_norm']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
