#!/usr/bin/env python3
"""Whole-model reference for `streamprune eval --json` perplexity: the same windows, transformers' own loss.

  python tools/reference_eval.py RESULTS.json [--dtype float32]

loads the model named in RESULTS.json whole with transformers, cuts the same text into the same windows
(the protocol of streamprune.evaluate.perplexity: whole text tokenized once, non-overlapping windows,
tail dropped, first N), takes exp of the mean of the model's own per-window losses, and prints both
perplexities and their relative difference, for the model and for its baseline if the file has one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@torch.no_grad()
def whole_model_perplexity(model_dir: str, text: str, seqlen: int, windows: int, dtype: torch.dtype) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    losses = []
    for i in range(windows):
        window = ids[i * seqlen : (i + 1) * seqlen][None]
        losses.append(model(input_ids=window, labels=window).loss.double().item())  # mean over seqlen - 1 tokens
    return math.exp(sum(losses) / len(losses))


def check(results: dict, dtype: torch.dtype) -> float:
    ppl = results["ppl"]
    if ppl["slices"]:
        raise SystemExit("this check covers the plain protocol (no --ppl-slices)")
    with open(ppl["dataset"], encoding="utf-8") as handle:
        text = handle.read()
    reference = whole_model_perplexity(results["model"], text, ppl["seqlen"], ppl["windows"], dtype)
    difference = ppl["value"] / reference - 1
    print(f"{results['model']}: streamed {ppl['value']:.4f}, whole model {reference:.4f}, "
          f"relative difference {100 * difference:+.4f}% ({ppl['windows']} x {ppl['seqlen']} tokens)")
    return difference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    args = parser.parse_args()
    with open(args.results, encoding="utf-8") as handle:
        results = json.load(handle)
    dtype = getattr(torch, args.dtype)
    differences = [check(results, dtype)]
    if results.get("baseline"):
        differences.append(check(results["baseline"], dtype))
    return 0 if all(abs(d) <= 0.002 for d in differences) else 1


if __name__ == "__main__":
    sys.exit(main())
