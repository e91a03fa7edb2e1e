"""EN-auto: each block picks its own Elastic-Net alpha (and geometry) from candidates.

The seed paper ("LLM Pruning with Elastic Net Enhanced Wanda Strategy", FLAIRS 2026) fixes one alpha for
the whole model, and its grid shows the best alpha depends on the model and the geometry.  Here each
block tries every candidate (`--alphas`, default 0,0.25,0.5,0.75,1; `--geometry` modified, original or
both; EN-Original at a = 1 is EN-Modified at a = 1 and is tried once) and keeps the one whose pruned
block's output is closest to the dense block's output:

    error(c) = mean over the chosen windows' tokens and hidden units of (B_c(x) - B(x))^2

where B is the dense block, B_c the block with candidate c's masks (kept weights unchanged) and x the
block's calibration inputs (the outputs of the blocks already pruned, as in every run).  Ties go to the
first candidate in the order given.  The candidates share the statistics of the one dense pass; the
dense outputs are computed once.

Which windows: a seeded share, `--auto-windows` (default 8) of the calibration windows, drawn with
--seed, the same for every block; they also feed the statistics (not held apart).  Why: the error of
each candidate costs one pass of the block over those windows and their dense outputs stay in memory,
so using a share bounds both (LLaMA-2-7B with 128 windows and 5 candidates: 5 x 8/128 of a pass and
128 MiB of float32 outputs per block, against 5 passes and 4 GiB for all windows); holding them apart
would change the statistics, so that en-auto choosing a alpha would no longer prune as the fixed method
does; and one number per block chosen on 8 x seqlen tokens hardly overfits.

The choice is made on the masks alone; with --reconstruct the chosen mask's kept weights are then updated.
N:M patterns work as for the fixed methods.  The chosen geometry and alpha of every block, and every
candidate's error, are recorded in the manifest (`block_choices`) and shown by the CLI and inspect.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import parse_pattern
from . import BlockView, Decision, Groups, Method, Option

ALPHAS = Option("alphas", (0.0, 0.25, 0.5, 0.75, 1.0), "EN-auto's candidate alphas, comma-separated.", low=0.0, high=1.0, numbers=True)
GEOMETRY = Option("geometry", "modified", "EN-auto's geometries: modified, original or both.", choices=("modified", "original", "both"))
AUTO_WINDOWS = Option("auto_windows", 8, "EN-auto: calibration windows its choice is measured on (seeded).", low=1, high=2**20, integer=True)


def candidates(config) -> list:
    """The configurations EN-auto tries, in order: per geometry (modified first with both), per alpha."""
    options = config.option_values
    geometries = ("modified", "original") if options["geometry"] == "both" else (options["geometry"],)
    shared = tuple((k, v) for k, v in config.options if k not in ("alphas", "geometry", "auto_windows"))
    configs = []
    for geometry in geometries:
        for alpha in options["alphas"]:
            if geometry == "original" and alpha == 1 and "modified" in geometries:
                continue  # the same pruning as EN-Modified at a = 1
            configs.append(dataclasses.replace(config, method=f"en-{geometry}", options=shared + (("alpha", alpha),)))
    return configs


def label(config) -> str:
    return f"{config.method.removeprefix('en-')} a={config.option_values['alpha']:g}"


def pick(view: BlockView, statistics: dict, configs: list, rows: int) -> tuple[int, list[float]]:
    """The index of the candidate whose masked block is closest to the dense block on `rows` windows
    (first among equals), and every candidate's mean squared error; the weights are restored."""
    from . import get_method  # the registry is complete once every method file is imported

    reference = view.outputs(rows)
    dense = {name: linear.weight.detach().clone() for name, linear in view.linears.items()}
    errors = []
    try:
        with torch.no_grad():
            for config in configs:
                method = get_method(config.method)
                for name, linear in view.linears.items():
                    keep = method.decide(dense[name], statistics.get(name), config, name).keep
                    linear.weight.copy_(dense[name]).masked_fill_(~keep, 0)
                difference = view.outputs(rows).sub_(reference)
                errors.append(float(difference.double().square().sum()) / difference.numel())
                del difference
    finally:
        with torch.no_grad():
            for name, linear in view.linears.items():
                linear.weight.copy_(dense[name])
    return min(range(len(errors)), key=errors.__getitem__), errors


def choice_text(choice: dict) -> str:
    """'modified a=0.25' for a block's record."""
    return f"{choice['method'].removeprefix('en-')} a={choice['alpha']:g}"


def choices_summary(choices: dict) -> str:
    """Consecutive blocks with the same choice on one line each, then how often each was chosen:
    'blocks 0-3: modified a=0.25', ..., 'chosen: modified a=0.25 x 20, original a=1 x 10'."""
    order = sorted(choices, key=int)
    lines, start = [], 0
    for position in range(1, len(order) + 1):
        if position == len(order) or choice_text(choices[order[position]]) != choice_text(choices[order[start]]):
            first, last = order[start], order[position - 1]
            blocks = f"block {first}" if first == last else f"blocks {first}-{last}"
            lines.append(f"  {blocks}: {choice_text(choices[first])}")
            start = position
    counts: dict[str, int] = {}
    for index in order:
        counts[choice_text(choices[index])] = counts.get(choice_text(choices[index]), 0) + 1
    tally = ", ".join(f"{text} x {count}" for text, count in sorted(counts.items(), key=lambda item: -item[1]))
    return "\n".join(["EN-auto's choice per block (geometry, alpha):", *lines, f"  chosen: {tally}"])


class ENAuto(Method):
    name = "en-auto"
    summary = "per block, the EN alpha (and geometry) whose masked block output is closest to the dense one"
    source = "FLAIRS 2026 EN scores; alpha chosen per block (streamprune)"
    order = 5
    needs = frozenset({"norms"})
    options = (ALPHAS, GEOMETRY, AUTO_WINDOWS)
    chooses_per_block = True

    def choose(self, view, statistics, config):
        configs = candidates(config)
        best, errors = pick(view, statistics, configs, config.option_values["auto_windows"])
        chosen = configs[best]
        record = {"method": chosen.method, "alpha": chosen.option_values["alpha"],
                  "mse": {label(c): e for c, e in zip(configs, errors)}}
        return chosen, record

    def choices_summary(self, choices: dict) -> str:
        return choices_summary(choices)

    def decide(self, weight, stats, config, name) -> Decision:
        raise RuntimeError("en-auto decides through the candidate choose() picks")

    def groups(self, config, in_features: int) -> Groups:
        if config.pattern:
            n, m = parse_pattern(config.pattern)
            return Groups(columns=m, n=n)
        return Groups(columns=in_features)


METHODS = [ENAuto()]
