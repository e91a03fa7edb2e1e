#!/usr/bin/env python3
"""CPU benchmark: streamed pruning against the whole-model way, in one run, on the same token ids.

Jobs (EN-Modified, a = 0.5, 50%), each pruned twice in fresh child processes:
  smollm2   SmolLM2-135M-Instruct (float32), 32 x 512 calibration tokens of the bundled WikiText slice
  smollm2-bf16  the same, streamed with --dtype bfloat16 (fast on CPUs with bf16 matrix units), against
            the same float32 whole-model run
  7b-4      random weights with LLaMA-2-7B's shapes (hidden 4096, MLP 11008, 32 heads), 4 blocks, float16,
            4 x 128 random calibration tokens
  7b-8      the same with 8 blocks
  streamed  `streamprune prune` (one block resident)
  whole     the reference way: the whole transformers model loaded, inputs of block 0 captured, then
            per block forward hooks collect float32 statistics over one sequence at a time, the block
            is pruned and run again on each sequence (as the Wanda and SparseGPT reference code do),
            and save_pretrained writes the result.
  floor     the compute floor of Wanda's protocol, in the streamed dtype: the whole model in memory and
            only the two passes of every block over all tokens (dense, then pruned), batched; no hooks,
            statistics, scoring, reading or writing.  No pruner that follows the protocol does less work.
  unchecked `streamprune prune` with its guards off (the private _STREAMPRUNE_UNCHECKED=1: no
            finiteness checks of what is read, statistics and scores, no sparsity post-condition), to
            measure what the guards cost; its output must be byte-identical to the checked run's.  Checked
            and unchecked runs alternate (--check-repeats pairs: checked first, then unchecked first), and
            the mean and the fastest of each are compared; the main table shows the first checked run.
Both compute in float32 unless said (float16 products on a CPU are about 100x slower). Printed: wall time,
the floor, peak RSS (each child's own VmHWM), seconds per block, their ratios, and how many mask entries differ.

  python benchmarks/prune_cpu.py --workdir /tmp/prunebench --json benchmarks/results/prune_cpu.json
  python benchmarks/prune_cpu.py --workdir /tmp/prunebench --jobs 7b-4,7b-8 --other-methods sparsegpt \
      --check-repeats 1 --json benchmarks/results/prune_cpu_sparsegpt.json
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
sys.path.insert(0, str(ROOT))
GIB = 2**30

WHOLE_MODEL = r'''
import json, sys, time
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM
from streamprune.state import peak_rss_bytes

model_dir, ids_file, out_dir, alpha, sparsity = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
started = time.perf_counter()
with safe_open(ids_file, framework="pt") as handle:
    ids = handle.get_tensor("input_ids")
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model.eval()
base = model.model
block_seconds = []
with torch.no_grad():
    inputs = [base.embed_tokens(ids[j : j + 1]) for j in range(ids.shape[0])]
    position_ids = torch.arange(ids.shape[1])[None]
    position_embeddings = base.rotary_emb(inputs[0], position_ids)
    call = dict(attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)
    for layer in base.layers:
        block_started = time.perf_counter()
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        sums = {n: [torch.zeros(m.in_features), torch.zeros(m.in_features), 0] for n, m in linears.items()}

        def hook(module, args, output, name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name][0] += x.abs().sum(0)
            sums[name][1] += (x * x).sum(0)
            sums[name][2] += x.shape[0]

        handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in linears.items()]
        for x in inputs:
            layer(x, **call)
        for handle in handles:
            handle.remove()
        for name, linear in linears.items():
            s1, s2, tokens = sums[name]
            scale = alpha * s1 / tokens + (1 - alpha) * torch.sqrt(s2 / tokens)
            score = linear.weight.abs() * scale
            k = int(sparsity * score.shape[1])
            lowest = torch.argsort(score, dim=1, stable=True)[:, :k]
            linear.weight.scatter_(1, lowest, 0.0)
        inputs = [layer(x, **call) for x in inputs]
        block_seconds.append(time.perf_counter() - block_started)
model.save_pretrained(out_dir)
print(json.dumps({"wall_s": time.perf_counter() - started, "peak_rss_bytes": peak_rss_bytes(), "blocks_s": block_seconds}))
'''


# The compute floor of any pruner that follows Wanda's protocol: the two passes of every block over all
# calibration tokens (dense, then pruned), batched, with no statistics, scoring, reading or writing.
COMPUTE_FLOOR = r'''
import json, sys, time
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from streamprune.blocks import reuse_freed_memory

reuse_freed_memory()  # the same allocator setting as streamprune's
model_dir, ids_file, dtype, batch_size = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), int(sys.argv[4])
with safe_open(ids_file, framework="pt") as handle:
    ids = handle.get_tensor("input_ids")
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
base = model.model
with torch.inference_mode():
    hidden = [base.embed_tokens(ids[j : j + batch_size]) for j in range(0, ids.shape[0], batch_size)]
    position_ids = torch.arange(ids.shape[1])[None]
    call = dict(attention_mask=None, position_ids=position_ids, position_embeddings=base.rotary_emb(hidden[0], position_ids))
    started = time.perf_counter()
    for layer in base.layers:
        for x in hidden:
            layer(x, **call)
        hidden = [layer(x, **call) for x in hidden]
print(json.dumps({"wall_s": time.perf_counter() - started}))
'''


def _child_json(script: str, *args) -> dict:
    started = time.perf_counter()
    result = run_script(script, *args)
    result["process_s"] = time.perf_counter() - started
    return result


def run_whole(model_dir: Path, ids_file: Path, out_dir: Path) -> dict:
    return _child_json(WHOLE_MODEL, model_dir, ids_file, out_dir, 0.5, 0.5)


def run_floor(model_dir: Path, ids_file: Path, dtype: str, batch_size: int) -> dict:
    return _child_json(COMPUTE_FLOOR, model_dir, ids_file, dtype, batch_size)


EN_MODIFIED = ("--method", "en-modified", "--alpha", "0.5")


def run_streamed(model_dir: Path, ids_file: Path, out_dir: Path, nsamples: int, seqlen: int, batch_size: int,
                 dtype: str, checks: bool = True, method: tuple[str, ...] = EN_MODIFIED) -> dict:
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not checks:
        env["_STREAMPRUNE_UNCHECKED"] = "1"
    subprocess.run(
        [sys.executable, "-m", "streamprune.cli", "prune", str(model_dir), str(out_dir), "--overwrite",
         *method, "--sparsity", "0.5", "--calib", str(ids_file),
         "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--batch-size", str(batch_size),
         "--device", "cpu", "--dtype", dtype, "--quiet"],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )
    manifest = json.loads((out_dir / "streamprune.json").read_text())
    return {"wall_s": manifest["timings"]["total_s"], "process_s": time.perf_counter() - started,
            "peak_rss_bytes": manifest["peak_memory"]["host_rss_bytes"], "blocks_s": manifest["timings"]["blocks_s"]}


def same_shards(a: Path, b: Path) -> bool:
    shards = sorted(p.name for p in a.glob("model-*.safetensors"))
    return shards == sorted(p.name for p in b.glob("model-*.safetensors")) and all(
        (a / name).read_bytes() == (b / name).read_bytes() for name in shards
    )


def differing_mask_entries(a: Path, b: Path) -> tuple[int, int]:
    from streamprune.checkpoint import CheckpointReader

    first, second = CheckpointReader(a), CheckpointReader(b)
    names = [n for n in first.keys() if ".layers." in n and n.endswith("proj.weight")]
    differ = entries = 0
    for name in names:
        x, y = first.read([name])[name] != 0, second.read([name])[name] != 0
        differ += (x != y).sum().item()
        entries += x.numel()
    return differ, entries


def main() -> int:
    import torch
    from make_checkpoint import PRESETS, make_random_checkpoint
    from safetensors.torch import save_file

    from streamprune.calibration import calibration_windows
    from streamprune.data import WIKITEXT_CALIBRATION
    from streamprune.demo import smollm2_checkpoint
    from streamprune.loading import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--jobs", default="smollm2,smollm2-bf16,7b-4,7b-8")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--check-repeats", type=int, default=2, help="pairs of checked and unchecked runs per job")
    parser.add_argument("--other-methods", default="", help="e.g. sparsegpt: also streamed with these methods (one run each)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    jobs, whole_runs = {}, {}
    for job in args.jobs.split(","):
        dtype = "bfloat16" if job.endswith("-bf16") else "float32"
        if job.startswith("smollm2"):
            model_dir = smollm2_checkpoint()
            ids = calibration_windows(str(WIKITEXT_CALIBRATION), load_tokenizer(model_dir), 32, 512, seed=0).input_ids
        else:
            layers = int(job.split("-")[1])
            model_dir = args.workdir / f"llama7b-shape-{layers}"
            if not (model_dir / "config.json").exists():
                make_random_checkpoint(model_dir, layers=layers, dtype="float16", max_shard_bytes=2 * GIB,
                                       **PRESETS["llama2-7b"])
            ids = torch.randint(0, 32000, (4, 128), generator=torch.Generator().manual_seed(0))
        base_job = job.removesuffix("-bf16")
        ids_file = args.workdir / f"{base_job}-ids.safetensors"
        save_file({"input_ids": ids}, ids_file)
        streamed_dir, whole_dir = args.workdir / f"{job}-streamed", args.workdir / f"{base_job}-whole"
        unchecked_dir = args.workdir / f"{job}-unchecked"
        runs = {True: [], False: []}
        for repeat in range(args.check_repeats):
            for checks in ((True, False) if repeat % 2 == 0 else (False, True)):
                runs[checks].append(run_streamed(model_dir, ids_file, streamed_dir if checks else unchecked_dir,
                                                 ids.shape[0], ids.shape[1], args.batch_size, dtype, checks=checks))
        streamed = runs[True][0]
        checked_s, unchecked_s = [r["wall_s"] for r in runs[True]], [r["wall_s"] for r in runs[False]]
        if base_job not in whole_runs:
            whole_runs[base_job] = run_whole(model_dir, ids_file, whole_dir)
        whole = whole_runs[base_job]
        floor = run_floor(model_dir, ids_file, dtype, args.batch_size)
        differ, entries = differing_mask_entries(streamed_dir, whole_dir)
        jobs[job] = {
            "checkpoint_bytes": sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")),
            "calibration": list(ids.shape),
            "streamed_dtype": dtype,
            "streamed": streamed,
            "other_methods": {
                method: run_streamed(model_dir, ids_file, args.workdir / f"{job}-{method}", ids.shape[0], ids.shape[1],
                                     args.batch_size, dtype, method=("--method", method))
                for method in filter(None, args.other_methods.split(","))
            },
            "checks": {
                "checked_runs": runs[True], "unchecked_runs": runs[False],
                "mean_ratio": (sum(checked_s) / len(checked_s)) / (sum(unchecked_s) / len(unchecked_s)),
                "fastest_ratio": min(checked_s) / min(unchecked_s),
                "same_bytes": same_shards(streamed_dir, unchecked_dir),
            },
            "whole": whole,
            "compute_floor": floor,
            "wall_ratio": streamed["wall_s"] / whole["wall_s"],
            "floor_ratio": floor["wall_s"] / whole["wall_s"],
            "rss_ratio": streamed["peak_rss_bytes"] / whole["peak_rss_bytes"],
            "mask_entries_differing": differ,
            "mask_entries": entries,
        }
        print(f"{job}: streamed {streamed['wall_s']:.1f} s {streamed['peak_rss_bytes'] / GIB:.2f} GiB "
              f"(checked {', '.join(f'{t:.1f}' for t in checked_s)} s, unchecked {', '.join(f'{t:.1f}' for t in unchecked_s)} s); "
              f"whole {whole['wall_s']:.1f} s {whole['peak_rss_bytes'] / GIB:.2f} GiB; floor {floor['wall_s']:.1f} s", flush=True)

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"batch size {args.batch_size}; whole-model runs in float32")
    print(f"{'job':<13}{'checked s':>16}{'unchecked s':>16}{'mean ratio':>11}{'fastest ratio':>14}{'peak GiB':>16}{'same bytes':>11}")
    for job, row in jobs.items():
        c = row["checks"]
        times = [" ".join(f"{r['wall_s']:.1f}" for r in c[f"{k}_runs"]) for k in ("checked", "unchecked")]
        peaks = [max(r["peak_rss_bytes"] for r in c[f"{k}_runs"]) / GIB for k in ("checked", "unchecked")]
        print(f"{job:<13}{times[0]:>16}{times[1]:>16}{c['mean_ratio']:>11.3f}{c['fastest_ratio']:>14.3f}"
              f"{peaks[0]:>8.2f}/{peaks[1]:<7.2f}{str(c['same_bytes']):>11}")
    if args.other_methods:
        print("\nother methods, streamed, against en-modified (a = 0.5) streamed in the same job")
        print(f"{'job':<13}{'method':>12}{'wall s':>9}{'ratio':>7}{'peak RSS GiB':>14}{'ratio':>7}")
        for job, row in jobs.items():
            for method, run in row["other_methods"].items():
                s = row["streamed"]
                print(f"{job:<13}{method:>12}{run['wall_s']:>9.1f}{run['wall_s'] / s['wall_s']:>7.2f}"
                      f"{run['peak_rss_bytes'] / GIB:>14.2f}{run['peak_rss_bytes'] / s['peak_rss_bytes']:>7.2f}")
    header = f"{'job':<13}{'tokens':>10}{'ckpt GiB':>9}{'wall s':>16}{'ratio':>7}{'floor s':>8}{'ratio':>7}" \
             f"{'peak RSS GiB':>18}{'ratio':>7}{'s/block':>16}{'masks differ':>14}"
    print(header)
    print(f"{'':<13}{'':>10}{'':>9}{'stream / whole':>16}{'':>7}{'':>8}{'':>7}{'stream / whole':>18}{'':>7}"
          f"{'stream / whole':>16}")
    for job, row in jobs.items():
        s, w = row["streamed"], row["whole"]
        per_block = (sum(s["blocks_s"]) / len(s["blocks_s"]), sum(w["blocks_s"]) / len(w["blocks_s"]))
        tokens = f"{row['calibration'][0]}x{row['calibration'][1]}"
        print(f"{job:<13}{tokens:>10}{row['checkpoint_bytes'] / GIB:>9.2f}{s['wall_s']:>8.1f}/{w['wall_s']:<7.1f}"
              f"{row['wall_ratio']:>7.2f}{row['compute_floor']['wall_s']:>8.1f}{row['floor_ratio']:>7.2f}"
              f"{s['peak_rss_bytes'] / GIB:>9.2f}/{w['peak_rss_bytes'] / GIB:<8.2f}"
              f"{row['rss_ratio']:>7.2f}{per_block[0]:>8.2f}/{per_block[1]:<7.2f}"
              f"{row['mask_entries_differing']:>8}/{row['mask_entries']:.1e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
            "batch_size": args.batch_size, "jobs": jobs,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
