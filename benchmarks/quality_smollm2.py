#!/usr/bin/env python3
"""Quality of every method on SmolLM2-135M (the embedded model), with time and peak memory against Wanda.

One set of calibration ids for every row (32 x 512 tokens of WikiText-2 test, seed 0), WikiText-2
validation perplexity on 16 x 512 tokens, CPU, float32.  Rows: magnitude, wanda, en-modified (a = 0.5),
each without and with --reconstruct, and sparsegpt; columns: 50%, 60%, 70%, 2:4, 4:8.  With --variants,
also the OWL rows (wanda, en-modified, sparsegpt with --budgets owl; unstructured shapes only).  Each pruning and
each evaluation is its own process (peak memory is its own); prune time and peak host memory are given
relative to wanda's at the same sparsity, from the same run.  Finished cells are kept in WORKDIR, so a
rerun continues where it stopped.

  python benchmarks/quality_smollm2.py --workdir /tmp/quality --json benchmarks/results/quality_smollm2.json \
      --calib ../shared/data/wikitext-2-raw/wiki.test.raw --ppl ../shared/data/wikitext-2-raw/wiki.valid.raw
  python benchmarks/quality_smollm2.py --workdir /tmp/quality --json benchmarks/results/quality_smollm2_owl.json \
      --calib ../shared/data/wikitext-2-raw/wiki.test.raw --ppl ../shared/data/wikitext-2-raw/wiki.valid.raw \
      --variants "wanda,wanda + OWL,en-modified a=0.5,en-modified a=0.5 + OWL" --shapes 50%,60%,70%
  python benchmarks/quality_smollm2.py --workdir /tmp/quality-auto --json benchmarks/results/quality_smollm2_en_auto.json \
      --calib ../shared/data/wikitext-2-raw/wiki.test.raw --ppl ../shared/data/wikitext-2-raw/wiki.valid.raw \
      --variants "en-modified a=0,en-modified a=0.25,en-modified a=0.5,en-modified a=0.75,en-modified a=1,en-original a=0,en-original a=0.25,en-original a=0.5,en-original a=0.75,en-auto,en-auto both" \
      --shapes 50%,70%
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from child import ROOT

sys.path.insert(0, str(ROOT))

VARIANTS = {  # label: prune options
    "magnitude": ["--method", "magnitude"],
    "magnitude + reconstruct": ["--method", "magnitude", "--reconstruct"],
    "wanda": ["--method", "wanda"],
    "wanda + reconstruct": ["--method", "wanda", "--reconstruct"],
    "en-modified a=0.5": ["--method", "en-modified", "--alpha", "0.5"],
    "en-modified a=0.5 + reconstruct": ["--method", "en-modified", "--alpha", "0.5", "--reconstruct"],
    "sparsegpt": ["--method", "sparsegpt"],
    # OWL budgets (--budgets owl, M 5, lambda 0.08): unstructured shapes only
    "wanda + OWL": ["--method", "wanda", "--budgets", "owl"],
    "en-modified a=0.5 + OWL": ["--method", "en-modified", "--alpha", "0.5", "--budgets", "owl"],
    "sparsegpt + OWL": ["--method", "sparsegpt", "--budgets", "owl"],
    # EN-auto against the fixed alphas of its candidates
    **{f"en-modified a={a}": ["--method", "en-modified", "--alpha", a] for a in ("0", "0.25", "0.75", "1")},
    **{f"en-original a={a}": ["--method", "en-original", "--alpha", a] for a in ("0", "0.25", "0.5", "0.75")},
    "en-auto": ["--method", "en-auto"],
    "en-auto both": ["--method", "en-auto", "--geometry", "both"],
}
DEFAULT_VARIANTS = list(VARIANTS)[:7]  # the methods table; the OWL and EN-auto rows on request
SHAPES = {"50%": ["--sparsity", "0.5"], "60%": ["--sparsity", "0.6"], "70%": ["--sparsity", "0.7"],
          "2:4": ["--pattern", "2:4"], "4:8": ["--pattern", "4:8"]}


def cli(*args) -> None:
    subprocess.run([sys.executable, "-m", "streamprune.cli", *map(str, args)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)


def evaluate(model: Path, ppl_text: str, out_json: Path) -> dict:
    if not out_json.exists():
        cli("eval", model, "--ppl", ppl_text, "--seqlen", 512, "--max-windows", 16, "--device", "cpu",
            "--dtype", "float32", "--quiet", "--json", out_json)
    return json.loads(out_json.read_text())


def main() -> int:
    from streamprune.calibration import calibration_windows, save_windows
    from streamprune.demo import smollm2_checkpoint
    from streamprune.loading import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--calib", required=True, help="calibration text (WikiText-2 test)")
    parser.add_argument("--ppl", required=True, help="evaluation text (WikiText-2 validation)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = smollm2_checkpoint()
    ids = args.workdir / "calibration_ids.safetensors"
    if not ids.exists():
        save_windows(ids, calibration_windows(args.calib, load_tokenizer(model), 32, 512, seed=0))
    dense = evaluate(model, args.ppl, args.workdir / "dense.json")
    cells: dict = {}
    for shape in args.shapes.split(","):
        for label in args.variants.split(","):
            slug = f"{label}-{shape}".replace(" ", "").replace("+", "-").replace("=", "").replace(":", "of").replace("%", "")
            out, result = args.workdir / slug, args.workdir / f"{slug}.json"
            if not result.exists():
                cli("prune", model, out, "--overwrite", *VARIANTS[label], *SHAPES[shape], "--calib", ids,
                    "--nsamples", 32, "--seqlen", 512, "--device", "cpu", "--dtype", "float32", "--quiet")
                manifest = json.loads((out / "streamprune.json").read_text())
                evaluation = evaluate(out, args.ppl, args.workdir / f"{slug}-eval.json")
                result.write_text(json.dumps({
                    "ppl": evaluation["ppl"]["value"], "prune_s": manifest["timings"]["total_s"],
                    "prune_peak_rss_bytes": manifest["peak_memory"]["host_rss_bytes"],
                    "sparsity": sum(manifest["sparsity"].values()) / len(manifest["sparsity"]),
                }))
                subprocess.run(["rm", "-rf", str(out)], check=True)
            cells[(label, shape)] = json.loads(result.read_text())
            print(f"{label:<34}{shape:>5}  ppl {cells[(label, shape)]['ppl']:9.2f}  {cells[(label, shape)]['prune_s']:7.1f} s", flush=True)

    shapes = args.shapes.split(",")
    variants = args.variants.split(",")
    print(f"\nSmolLM2-135M-Instruct, WikiText-2 validation perplexity (16 x 512), dense {dense['ppl']['value']:.2f}; "
          f"calibration 32 x 512 of WikiText-2 test; CPU float32")
    print(f"{'method':<34}" + "".join(f"{s:>10}" for s in shapes))
    for label in variants:
        print(f"{label:<34}" + "".join(f"{cells[(label, s)]['ppl']:>10.2f}" for s in shapes))
    print("\nprune time and peak host memory relative to wanda at the same sparsity (wanda: seconds, GiB)")
    print(f"{'method':<34}" + "".join(f"{s:>14}" for s in shapes))
    for label in variants:
        row = []
        for s in shapes:
            c, w = cells[(label, s)], cells[("wanda", s)] if ("wanda", s) in cells else None
            if w is None:
                row.append(f"{'':>14}")
            elif label == "wanda":
                row.append(f"{c['prune_s']:>7.1f}s/{c['prune_peak_rss_bytes'] / 2**30:.2f}G")
            else:
                row.append(f"{c['prune_s'] / w['prune_s']:>8.2f}x/{c['prune_peak_rss_bytes'] / w['prune_peak_rss_bytes']:.2f}x")
        print(f"{label:<34}" + "".join(f"{r:>14}" for r in row))
    if any(label.startswith("en-auto") for label in variants) and "en-modified a=0.5" in variants:
        print("\nEN-auto's prune time against en-modified a=0.5 at the same sparsity, same run")
        for label in [v for v in variants if v.startswith("en-auto")]:
            print(f"{label:<34}" + "".join(f"{cells[(label, s)]['prune_s'] / cells[('en-modified a=0.5', s)]['prune_s']:>9.2f}x"
                                         for s in shapes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "dense_ppl": dense["ppl"]["value"],
            "cells": [{"method": label, "shape": shape, **cells[(label, shape)]} for label in variants for shape in shapes],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
