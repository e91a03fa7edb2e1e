"""`streamprune inspect DIR`: what a (pruned) checkpoint holds, how sparse it is, and whether it is whole.

Works on any safetensors checkpoint whose decoder blocks streamprune can find, finished or not: with an index it checks
that every tensor the index names is in its file with the shape the config implies, finite, and that
none the config implies is missing; without one (a run still going, or interrupted) it checks the shards that
are there and the blocks the run's manifest says are done.  Tensors are read one at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .blocks import blocks_beyond_config, empty_model, expected_shapes, shape_problems
from .checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointReader
from .checks import all_finite, nonfinite_summary
from .errors import StreamPruneError
from .families import derive_layout
from .loading import load_config
from .masking import zero_fraction
from .state import RunManifest


def _weight_map(directory: Path, problems: list[str]) -> dict[str, str]:
    """name -> file from the index (checking its files), else from the shards present."""
    if (directory / INDEX_FILE).is_file() or (directory / SINGLE_FILE).is_file():
        try:
            return CheckpointReader(directory).weight_map
        except StreamPruneError as exc:
            problems.append(str(exc))
            return {}
    weight_map = {}
    for shard in sorted(directory.glob("model-*-of-*.safetensors")):
        try:
            with safe_open(shard, framework="pt") as handle:
                weight_map.update({key: shard.name for key in handle.keys()})
        except (SafetensorError, OSError) as exc:
            problems.append(f"{shard.name} is not a readable safetensors file ({exc})")
    return weight_map


def inspect_checkpoint(directory: str | Path, trust_remote_code: bool = False) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise StreamPruneError(f"{directory} is not a directory")
    manifest = RunManifest.load(directory)
    config_dir = directory
    if not (directory / "config.json").is_file() and manifest and Path(manifest.model).is_dir():
        config_dir = Path(manifest.model)  # an unfinished run: its config comes with the last files
    config = load_config(config_dir, trust_remote_code)
    problems: list[str] = []
    weight_map = _weight_map(directory, problems)
    model = empty_model(config, torch.float32, trust_remote_code)
    layout = derive_layout(model, config, weight_map.keys())
    expected = expected_shapes(model, config, layout)
    complete = (directory / INDEX_FILE).is_file() or (directory / SINGLE_FILE).is_file()

    shapes, sparsity, dtypes = {}, {}, set()
    for filename in sorted(set(weight_map.values())):
        with safe_open(directory / filename, framework="pt") as handle:
            for key in (k for k, f in weight_map.items() if f == filename):
                tensor = handle.get_tensor(key)
                if not all_finite(tensor):
                    problems.append(f"tensor {key} has {nonfinite_summary(tensor)}")
                shapes[key] = tuple(tensor.shape)
                dtypes.add(str(tensor.dtype).removeprefix("torch."))
                if tensor.ndim == 2 and layout.is_block_key(key):
                    sparsity[key] = zero_fraction(tensor)

    blocks_total = layout.num_blocks
    blocks_done = [
        i for i in range(blocks_total)
        if all(k in shapes for k in expected if k.startswith(layout.block_prefix(i)))
    ]
    if complete:
        wanted = expected
    else:  # only what the run says it has written
        written = manifest.blocks_done if manifest else len(blocks_done)
        prefixes = tuple(layout.block_prefix(i) for i in range(written))
        wanted = {k: v for k, v in expected.items() if k.startswith(prefixes)}
    if manifest and manifest.status == "failed":
        problems.append(f"the streamprune run failed: {manifest.error}")
    problems += shape_problems(wanted, shapes) + blocks_beyond_config(shapes, layout)
    problems += [f"tensor {k} has shape {list(v)}; the config implies {list(expected[k])}"
                 for k, v in shapes.items() if k in expected and k not in wanted and v != expected[k]]

    per_block = {}
    for i in blocks_done:
        values = [v for k, v in sparsity.items() if k.startswith(layout.block_prefix(i))]
        if values:
            per_block[i] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "tensors": len(values)}
    budgets = (manifest.budgets or {}).get("sparsities") if manifest else None
    choices = manifest.block_choices if manifest else {}
    for i, row in per_block.items():
        if budgets and i < len(budgets):
            row["budget"] = budgets[i]
        if str(i) in choices:
            choice = choices[str(i)]
            row["choice"] = f"{choice['method'].removeprefix('en-')} a={choice['alpha']:g}"
    zeros = sum(sparsity[k] * torch.Size(shapes[k]).numel() for k in sparsity)
    weights = sum(torch.Size(shapes[k]).numel() for k in sparsity)
    return {
        "directory": str(directory),
        "model_type": config.model_type,
        "dtypes": sorted(dtypes),
        "complete": complete and not problems,
        "run_status": manifest.status if manifest else None,
        "run_method": run_method(manifest.config) if manifest else None,
        "run_error": manifest.error if manifest else None,
        "run_checked": manifest.checked if manifest else None,
        "blocks_total": blocks_total,
        "blocks_done": len(blocks_done),
        "sparsity": sparsity,
        "per_block": per_block,
        "overall_sparsity": zeros / weights if weights else 0.0,
        "block_linear_weights": weights,
        "problems": problems,
    }


def run_method(config: dict) -> str:
    """'sparsegpt (percdamp 0.01, blocksize 128), 50%': the method of a run and its options, from the
    registry (an unknown method, from another version, is named as recorded)."""
    from .methods import METHODS, option_text
    from .obs import OPTIONS

    method = METHODS.get(config.get("method"))
    names = [o.name for o in method.options] if method else []
    names += [o.name for o in OPTIONS if config.get("reconstruct") and o.name not in names]
    options = ", ".join(f"{name} {option_text(config[name])}" for name in names if name in config)
    shape = config.get("pattern") or f"{config.get('sparsity', 0):.0%}"
    rebuilt = " + reconstruct" if config.get("reconstruct") else ""
    if config.get("budgets") == "owl":
        shape += f" on average, OWL budgets (M {config.get('owl_m', 0):g}, lambda {config.get('owl_lambda', 0):g})"
    return f"{config.get('method')}{rebuilt}{f' ({options})' if options else ''}, {shape}"


def format_report(report: dict) -> str:
    run = f"; streamprune run {report['run_status']}" if report["run_status"] else ""
    if report.get("run_method"):
        run += f" ({report['run_method']})"
    if report.get("run_checked") is False:
        run += ", made with its checks off"
    lines = [
        f"{report['directory']}: {report['model_type']}, {report['blocks_total']} blocks, "
        f"{'/'.join(report['dtypes']) or 'no tensors'}{run}; {report['blocks_done']} of {report['blocks_total']} blocks present",
        f"{'block':>5}  {'tensors':>7}  {'sparsity':>8}  {'min':>7}  {'max':>7}"
        + ("  OWL budget" if any("budget" in row for row in report["per_block"].values()) else "")
        + ("  EN-auto choice" if any("choice" in row for row in report["per_block"].values()) else ""),
    ]
    for block, row in report["per_block"].items():
        budget = f"  {row['budget']:>10.2%}" if "budget" in row else ""
        choice = f"  {row['choice']}" if "choice" in row else ""
        lines.append(f"{block:>5}  {row['tensors']:>7}  {row['mean']:>8.2%}  {row['min']:>7.2%}  {row['max']:>7.2%}{budget}{choice}")
    lines.append(f"overall: {report['overall_sparsity']:.2%} of {report['block_linear_weights']:,} block linear weights are zero")
    if report["problems"]:
        lines += [f"problem: {p}" for p in report["problems"]]
    elif report["complete"]:
        lines.append("OK: every tensor is present with the shape the config implies")
    else:
        lines.append("OK so far: the blocks written are whole; the checkpoint is not finished (no index yet)")
    return "\n".join(lines)
