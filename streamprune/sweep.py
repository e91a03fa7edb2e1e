"""`streamprune sweep`: the paper's experiment, alpha x geometry x sparsity (x pattern), in one command.

Every configuration is pruned with the same calibration token ids (drawn once, kept in OUTDIR) and
evaluated with the same options as the dense model (evaluated once).  Each configuration's results go
to OUTDIR/results/<name>.json as soon as it is done, so a rerun of the same command skips finished
configurations and resumes an interrupted one inside its pruning (see engine.py).  Configurations that
are the same pruning are done once: EN-Original and EN-Modified coincide at alpha = 1.  A configuration
whose numbers fail (activations that overflow, a log-likelihood that is not finite: NumericalError) is
recorded as failed with the reason, and the sweep goes on; other errors stop it.

Outputs: results.json, results.csv (one row per configuration, the dense model first), results.md (a
table in the paper's layout per sparsity or pattern, dense row and best pruned row marked, then every
metric), and plots/*.png (perplexity and macro accuracy against alpha, perplexity against sparsity).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .calibration import calibration_windows, save_windows
from .checkpoint import resolve_model_dir, write_json
from .config import PruneConfig, parse_pattern
from .engine import prune
from .errors import NumericalError, StreamPruneError, one_line
from .evaluate.runner import EvalConfig, evaluate
from .loading import load_tokenizer
from .placement import Budget
from .state import CALIBRATION_IDS_FILE, RunManifest, input_fingerprint, version_difference, versions

log = logging.getLogger("streamprune")

GEOMETRIES = {"original": "en-original", "modified": "en-modified"}
SPEC_FILE = "sweep.json"


@dataclass(frozen=True)
class SweepSpec:
    # the grid (may grow between runs of the same sweep)
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    geometries: tuple[str, ...] = ("original", "modified")
    sparsities: tuple[float, ...] = (0.5,)
    patterns: tuple[str, ...] = ("unstructured",)  # "unstructured" uses the sparsities; "2:4" is 50% by itself
    keep: bool = False  # keep the pruned checkpoints (else deleted once evaluated)
    # calibration: one set for every configuration
    calib: str = "wikitext103"
    nsamples: int = 128
    calib_seqlen: int = 2048
    seed: int = 0
    stat_norm: str = "mean"
    # evaluation: the same for the dense model and every configuration
    ppl: str | None = "wikitext103"
    ppl_slices: int | None = None
    seqlen: int = 2048
    max_windows: int | None = None
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    data_dir: str | None = None
    # where and how the blocks run
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 4

    GRID = ("alphas", "geometries", "sparsities", "patterns", "keep")

    def __post_init__(self):
        for name in ("alphas", "geometries", "sparsities", "patterns", "tasks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = [g for g in self.geometries if g not in GEOMETRIES]
        if unknown:
            raise StreamPruneError(f"unknown geometry {unknown[0]!r}; choose from {', '.join(GEOMETRIES)}")
        for pattern in self.patterns:
            if pattern != "unstructured":
                parse_pattern(pattern)
        if not (self.alphas and self.geometries and self.patterns) or ("unstructured" in self.patterns and not self.sparsities):
            raise StreamPruneError("the grid is empty: give alphas, geometries and sparsities or patterns")
        self.eval_config()  # validates the evaluation options
        for point in self.points():
            point.prune_config(self, calib="unused")  # validates alpha, sparsity and the rest

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "SweepSpec":
        """A JSON or YAML file with any of the fields; `overrides` (from the command line) win."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise StreamPruneError(f"cannot read sweep spec {path}: {exc.strerror}") from exc
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        except Exception as exc:
            raise StreamPruneError(f"sweep spec {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise StreamPruneError(f"sweep spec {path} has unknown field {unknown[0]!r}; fields: {', '.join(sorted(names))}")
        return cls(**{**values, **overrides})

    def fixed(self) -> dict:
        """The options every configuration shares; a sweep cannot continue under other ones."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.GRID}

    def points(self) -> list["GridPoint"]:
        shapes = [(s, None) for s in self.sparsities] if "unstructured" in self.patterns else []
        shapes += [(parse_pattern(p)[0] / parse_pattern(p)[1], p) for p in self.patterns if p != "unstructured"]
        return [GridPoint(g, float(a), float(s), p) for s, p in shapes for g in self.geometries for a in self.alphas]

    def eval_config(self) -> EvalConfig:
        return EvalConfig(ppl=self.ppl, ppl_slices=self.ppl_slices, tasks=self.tasks, seqlen=self.seqlen,
                          max_windows=self.max_windows, limit=self.limit, data_dir=self.data_dir,
                          device=self.device, dtype=self.dtype, batch_size=self.batch_size)


@dataclass(frozen=True)
class GridPoint:
    geometry: str
    alpha: float
    sparsity: float
    pattern: str | None = None

    @property
    def shape(self) -> str:
        return self.pattern or f"{self.sparsity:g}"

    @property
    def label(self) -> str:
        return f"EN-{self.geometry.capitalize()} a={self.alpha:g} {self.pattern or f'{self.sparsity:.0%}'}"

    @property
    def prune_key(self) -> str:
        """The same name for configurations that prune identically (both geometries at alpha = 1)."""
        geometry = "modified" if self.alpha == 1 else self.geometry
        shape = self.pattern.replace(":", "of") if self.pattern else f"s{self.sparsity:g}"
        return f"{geometry}-a{self.alpha:g}-{shape}"

    def prune_config(self, spec: SweepSpec, calib: str) -> PruneConfig:
        return PruneConfig.of(
            method=GEOMETRIES[self.geometry], alpha=self.alpha, sparsity=self.sparsity, pattern=self.pattern,
            calib=calib, nsamples=spec.nsamples, seqlen=spec.calib_seqlen, seed=spec.seed, stat_norm=spec.stat_norm,
            device=spec.device, dtype=spec.dtype, batch_size=spec.batch_size,
        )


def _open_sweep(outdir: Path, model_dir: Path, spec: SweepSpec, overwrite: bool) -> None:
    """A new sweep directory, or an earlier one with the same fixed options (the grid may differ)."""
    recorded_path = outdir / SPEC_FILE
    current = {**spec.fixed(), "model_fingerprint": input_fingerprint(model_dir)}
    if outdir.exists() and any(outdir.iterdir()):
        if not recorded_path.is_file():
            if not overwrite:
                raise StreamPruneError(f"{outdir} is not empty and holds no sweep; pass --overwrite to replace it")
            shutil.rmtree(outdir)
        else:
            recorded = json.loads(recorded_path.read_text())
            changed = [k for k, v in current.items() if _as_json(recorded.get(k)) != _as_json(v)]
            if changed and not overwrite:
                k = changed[0]
                what = "the model" if k == "model_fingerprint" else f"--{k.replace('_', '-')}"
                raise StreamPruneError(
                    f"{outdir} holds a sweep with other settings ({what} differs); "
                    "rerun with the same settings to continue it, or pass --overwrite to start over"
                )
            if changed:
                shutil.rmtree(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    write_json(recorded_path, current)


def _as_json(value):
    return json.loads(json.dumps(value))


def _row(label: str, point: GridPoint | None, result: dict) -> dict:
    row = {
        "label": label,
        "method": point and GEOMETRIES[point.geometry],
        "geometry": point and point.geometry,
        "alpha": point and point.alpha,
        "sparsity": point.sparsity if point else 0.0,
        "pattern": (point.pattern or "unstructured") if point else None,
    }
    if "failed" in result:  # no metrics: why is in the row instead
        return {**row, "failed": result["failed"], "prune_s": None, "eval_s": None}
    evaluation = result["eval"]
    if "ppl" in evaluation:
        row["ppl"] = evaluation["ppl"]["value"]
        row["ppl_slices"] = evaluation["ppl"]["slices"]
        row["ppl_slices_mean"] = evaluation["ppl"]["slices_mean"]
    for task, metrics in evaluation.get("tasks", {}).items():
        if task != "macro_mean":
            row[f"{task}_{metrics['primary']}"] = metrics[metrics["primary"]]
    if "tasks" in evaluation:
        row["macro_mean"] = evaluation["tasks"]["macro_mean"]
    row["prune_s"] = result.get("prune_s", 0.0)
    row["eval_s"] = evaluation["timings"]["total_s"]
    peaks = [result.get("prune_peak", {}), evaluation["peak_memory"]]  # each its own run's peak
    row["peak_host_rss_bytes"] = max(peak.get("host_rss_bytes", 0) for peak in peaks)
    if any("gpu_allocated_bytes" in peak for peak in peaks):
        row["peak_gpu_allocated_bytes"] = max(peak.get("gpu_allocated_bytes", 0) for peak in peaks)
    return row


def run_sweep(model: str, outdir: str | Path, spec: SweepSpec, *, overwrite: bool = False, progress: bool = True,
              budget: Budget | None = None, echo=print) -> list[dict]:
    """Prunes and evaluates every configuration of `spec` plus the dense model; returns the result rows."""
    outdir = Path(outdir)
    model_dir = resolve_model_dir(model)
    _open_sweep(outdir, model_dir, spec, overwrite)
    results_dir = outdir / "results"
    results_dir.mkdir(exist_ok=True)

    ids_file = outdir / CALIBRATION_IDS_FILE
    if not ids_file.is_file():
        calibration = calibration_windows(spec.calib, load_tokenizer(model_dir), spec.nsamples, spec.calib_seqlen, spec.seed, progress)
        save_windows(ids_file, calibration)

    dense_file = results_dir / "dense.json"
    if not dense_file.is_file():
        echo("Evaluating the dense model ...")
        write_json(dense_file, {"eval": evaluate(model_dir, spec.eval_config(), progress=progress, budget=budget)})

    points = spec.points()
    unique = {point.prune_key: point for point in points}
    for number, (key, point) in enumerate(unique.items(), 1):
        result_file = results_dir / f"{key}.json"
        if result_file.is_file():
            continue
        echo(f"[{number}/{len(unique)}] {point.label}: pruning and evaluating ...")
        checkpoint = outdir / "checkpoints" / key
        started = time.perf_counter()
        try:
            earlier = RunManifest.load(checkpoint) if checkpoint.is_dir() else None
            if earlier is not None and earlier.status == "complete":
                manifest = earlier  # pruned before an interruption, not yet evaluated
            else:
                # an unfinished pruning from before a torch or transformers upgrade cannot resume bitwise
                resume = earlier is None or version_difference(earlier.versions, versions()) is None
                manifest = prune(model_dir, checkpoint, point.prune_config(spec, str(ids_file)), progress=progress,
                                 budget=budget, resume=resume)
            evaluation = evaluate(checkpoint, spec.eval_config(), progress=progress, budget=budget)
            write_json(result_file, {
                "prune_s": manifest.timings["total_s"], "prune_peak": manifest.peak_memory, "eval": evaluation,
                "sparsity": manifest.config["sparsity"], "pattern": manifest.config["pattern"],
                "elapsed_s": round(time.perf_counter() - started, 3),
            })
        except NumericalError as exc:  # this configuration's numbers, not the sweep's: record it and go on
            log.warning("%s failed: %s", point.label, exc)
            write_json(result_file, {"failed": one_line(exc), "elapsed_s": round(time.perf_counter() - started, 3)})
        if not spec.keep and checkpoint.exists():
            shutil.rmtree(checkpoint)
            if not any(checkpoint.parent.iterdir()):
                checkpoint.parent.rmdir()

    rows = [_row("dense", None, json.loads(dense_file.read_text()))]
    rows += [_row(point.label, point, json.loads((results_dir / f"{point.prune_key}.json").read_text())) for point in points]
    write_results(outdir, rows, spec)
    return rows


def write_results(outdir: Path, rows: list[dict], spec: SweepSpec) -> None:
    write_json(outdir / "results.json", {"spec": dataclasses.asdict(spec), "rows": rows})
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (outdir / "results.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    (outdir / "results.md").write_text(markdown_tables(rows, spec), encoding="utf-8")
    plot_results(outdir / "plots", rows)


def _fmt(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_tables(rows: list[dict], spec: SweepSpec) -> str:
    """Per sparsity or pattern: alpha down, geometry across (ppl, macro accuracy), as the paper lays it out."""
    dense, pruned = rows[0], rows[1:]
    has_ppl, has_acc = "ppl" in dense, "macro_mean" in dense
    lines = ["# Sweep results", ""]
    if has_ppl and dense.get("ppl_slices"):
        lines += [f"ppl: over all the windows of the {len(dense['ppl_slices'])} slices, pooled (exp of the mean token "
                  "NLL); each slice's perplexity and their mean are in results.csv.", ""]
    for shape in dict.fromkeys((r["pattern"], r["sparsity"]) for r in pruned):
        group = [r for r in pruned if (r["pattern"], r["sparsity"]) == shape]
        title = f"{shape[1]:.0%} unstructured" if shape[0] == "unstructured" else f"{shape[0]} semi-structured"
        done = [r for r in group if "failed" not in r]
        best = None
        if done:
            best = min(done, key=lambda r: r["ppl"]) if has_ppl else max(done, key=lambda r: r["macro_mean"])
        header = ["alpha"]
        for geometry in spec.geometries:
            name = f"EN-{geometry.capitalize()}"
            header += [f"{name} ppl"] * has_ppl + [f"{name} macro acc"] * has_acc
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        dense_cells = (["dense (0%)"] + ([_fmt(dense.get("ppl"), 2)] * has_ppl + [_fmt(dense.get("macro_mean"), 4)] * has_acc)
                       * len(spec.geometries))
        lines.append("| " + " | ".join(f"*{c}*" for c in dense_cells) + " |")
        for alpha in spec.alphas:
            cells = [f"{alpha:g}"]
            for geometry in spec.geometries:
                row = next(r for r in group if r["geometry"] == geometry and r["alpha"] == alpha)
                if "failed" in row:
                    cells += ["failed"] * (has_ppl + has_acc)
                    continue
                mark = "**" if row is best else ""
                cells += [f"{mark}{_fmt(row.get('ppl'), 2)}{mark}"] * has_ppl + [f"{mark}{_fmt(row.get('macro_mean'), 4)}{mark}"] * has_acc
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Best pruned: **{best['label']}** (bold); dense in italics." if best else "Every configuration failed.", ""]
    metric_columns = [k for k in rows[0] if k.endswith(("_acc", "_acc_norm"))] + ["macro_mean"] * has_acc
    lines += ["## Every configuration", "",
              "| configuration | " + " | ".join((["ppl"] if has_ppl else []) + metric_columns + ["prune s", "eval s"]) + " |",
              "|" + "---|" * (1 + has_ppl + len(metric_columns) + 2)]
    for row in rows:
        cells = [row["label"]] + ([_fmt(row.get("ppl"), 2)] if has_ppl else [])
        cells += [_fmt(row.get(c), 4) for c in metric_columns] + [_fmt(row["prune_s"], 0), _fmt(row["eval_s"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [row for row in rows if "failed" in row]
    if failed:
        lines += ["", "## Failed configurations", "", "Recorded once; delete a configuration's file in results/ to run it again.", ""]
        lines += [f"- {row['label']}: {row['failed']}" for row in failed]
    return "\n".join(lines) + "\n"


def plot_results(directory: Path, rows: list[dict]) -> list[Path]:
    """Perplexity and macro accuracy against alpha (a line per geometry, a figure per sparsity or
    pattern), perplexity against sparsity (a line per geometry and alpha); the dense model as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise StreamPruneError("plots need matplotlib: pip install 'streamprune[plot]'") from exc
    directory.mkdir(parents=True, exist_ok=True)
    dense, pruned = rows[0], [row for row in rows[1:] if "failed" not in row]  # a failed one has no point
    written = []

    def finish(figure, axis, title: str, ylabel: str, xlabel: str, name: str, reference: float | None) -> None:
        if reference is not None:
            axis.axhline(reference, color="grey", linestyle="--", label="dense")
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(directory / name, dpi=120)
        plt.close(figure)
        written.append(directory / name)

    metrics = [(m, label) for m, label in (("ppl", "perplexity"), ("macro_mean", "macro accuracy")) if m in dense]
    for pattern, sparsity in dict.fromkeys((r["pattern"], r["sparsity"]) for r in pruned):
        group = [r for r in pruned if (r["pattern"], r["sparsity"]) == (pattern, sparsity)]
        shape = f"{sparsity:.0%} unstructured" if pattern == "unstructured" else pattern
        slug = f"s{sparsity:g}" if pattern == "unstructured" else pattern.replace(":", "of")
        for metric, label in metrics:
            figure, axis = plt.subplots(figsize=(6, 4))
            for geometry in dict.fromkeys(r["geometry"] for r in group):
                line = sorted((r["alpha"], r[metric]) for r in group if r["geometry"] == geometry)
                axis.plot([a for a, _ in line], [v for _, v in line], marker="o", label=f"EN-{geometry.capitalize()}")
            finish(figure, axis, f"{label.capitalize()} vs alpha, {shape}", label, "alpha (L1 share)",
                   f"{metric}_vs_alpha_{slug}.png", dense[metric])
    if "ppl" in dense:
        unstructured = [r for r in pruned if r["pattern"] == "unstructured"]
        figure, axis = plt.subplots(figsize=(6, 4))
        for geometry, alpha in dict.fromkeys((r["geometry"], r["alpha"]) for r in unstructured):
            if alpha == 1 and geometry != "modified" and any(r["alpha"] == 1 and r["geometry"] == "modified" for r in unstructured):
                continue  # the same line as EN-Modified at alpha = 1
            label = "a=1 (both geometries)" if alpha == 1 else f"EN-{geometry.capitalize()} a={alpha:g}"
            line = [(0.0, dense["ppl"])] + sorted(
                (r["sparsity"], r["ppl"]) for r in unstructured if (r["geometry"], r["alpha"]) == (geometry, alpha)
            )
            axis.plot([s for s, _ in line], [p for _, p in line], marker="o", label=label)
        finish(figure, axis, "Perplexity vs sparsity (dense at 0)", "perplexity", "sparsity", "ppl_vs_sparsity.png", dense["ppl"])
    return written
