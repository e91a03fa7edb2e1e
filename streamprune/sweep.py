"""`streamprune sweep`: a grid of prune configurations, each pruned and evaluated, in one command.

The spec is a prune configuration and an evaluation configuration plus grids of values: the methods
(any registered one; by default the paper's two Elastic-Net geometries), alpha (for every method that
takes it), any other method option (`options`), with and without --reconstruct, sparsities and N:M
patterns, the number of calibration draws (`seeds`), and `grid`: values of any other field of the spec
(the calibration's source, size and window, the statistics' norm, the evaluation's texts, tasks and
window, the dtype...), each combination a *setting* with its own section of results.md.  Every
configuration of one draw (and calibration setting) is pruned with
the same calibration token ids (drawn once, kept in OUTDIR) and evaluated with the same options as the
dense model (evaluated once).  Each configuration's results go to OUTDIR/results/<name>.json as soon as
it is done, so a rerun of the same command skips finished configurations and resumes an interrupted one
inside its pruning (see engine.py).  Configurations that prune identically are done once: options a
method does not take are not part of its configuration, EN-Original and EN-Modified coincide at
alpha = 1, and settings that differ only in evaluation fields evaluate one pruned checkpoint.  A configuration whose numbers fail (activations that overflow, a log-likelihood that is not
finite: NumericalError) is recorded as failed with the reason, and the sweep goes on; other errors stop it.

With several draws (seeds), a row is a configuration's mean over its draws, with the standard deviation
and the extremes of perplexity and macro accuracy beside it (`ppl_std`, `ppl_min`, `ppl_max`, and each
draw's value in `ppl_seeds`); tables show mean ± std and plots error bars.

Outputs: results.json, results.csv (one row per configuration, the dense model first), results.md (the
paper's table, alpha down and the geometries across, per sparsity or pattern, for the Elastic-Net rows;
a table per sparsity or pattern for the other methods; then every metric), and plots/*.png (perplexity
and macro accuracy against alpha, perplexity against sparsity).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .calibration import calibration_windows, save_windows
from .checkpoint import check_writable, resolve_model_dir, write_json
from .config import PruneConfig, parse_pattern
from .engine import prune
from .errors import NumericalError, StreamPruneError, one_line
from .evaluate.runner import EvalConfig, evaluate, table_metrics
from .loading import load_tokenizer
from .methods import METHODS, get_method, option_text
from .budgets import OPTIONS as OWL_OPTIONS
from .obs import OPTIONS as OBS_OPTIONS
from .placement import Budget
from .state import CALIBRATION_IDS_FILE, OutputLock, RunManifest, input_fingerprint, make_output, version_difference, versions

log = logging.getLogger("streamprune")

GEOMETRIES = {"original": "en-original", "modified": "en-modified"}
SPEC_FILE = "sweep.json"
# which fields of the spec a setting changes the pruning, the calibration draw or the evaluation with
CALIBRATION_FIELDS = ("calib", "nsamples", "calib_seqlen")
PRUNE_FIELDS = CALIBRATION_FIELDS + ("stat_norm", "budgets", "device", "dtype", "batch_size")
EVAL_FIELDS = ("ppl", "ppl_slices", "seqlen", "max_windows", "tasks", "limit", "data_dir", "include_path", "num_fewshot",
               "device", "dtype", "batch_size")
EVAL_ONLY_FIELDS = tuple(f for f in EVAL_FIELDS if f not in PRUNE_FIELDS)  # a result file's name has the others already
_INTEGER_FIELDS = ("nsamples", "calib_seqlen", "ppl_slices", "seqlen", "max_windows", "limit", "num_fewshot", "batch_size")


def _listed(values) -> list:
    return list(values) if isinstance(values, (list, tuple)) else [values]


def _field_value(name: str, value):
    """A grid value as the field takes it: the command line gives strings ('64', 'none', 'boolq+hellaswag')."""
    if isinstance(value, str):
        if value.lower() in ("none", "null"):
            return None
        if name in _INTEGER_FIELDS:
            try:
                return int(value)
            except ValueError:
                raise StreamPruneError(f"the sweep's grid gives {name} the value {value!r}, not a whole number") from None
        if name == "tasks":
            return tuple(t for t in value.split("+") if t)
    if name == "tasks":
        return tuple(_listed(value))
    return value


def _slug(value) -> str:
    """A value as part of a file name: itself when short and plain, else a digest (paths, long lists)."""
    text = "+".join(map(str, value)) if isinstance(value, tuple) else str(value)
    if re.fullmatch(r"[A-Za-z0-9._+]{1,24}", text):
        return text
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _suffix(setting: dict, fields: tuple[str, ...]) -> str:
    """The part of a file name that tells the `fields` of a setting apart ('' without a grid)."""
    return "".join(f"-{name}{_slug(value)}" for name, value in setting.items() if name in fields)


def setting_label(setting: dict) -> str:
    """'nsamples=64 seqlen=512' (tasks joined by +)."""
    return " ".join(f"{k}={'+'.join(v) if isinstance(v, tuple) else v}" for k, v in setting.items())


@dataclass(frozen=True)
class SweepSpec:
    # the grid (may grow between runs of the same sweep)
    methods: tuple[str, ...] = ()  # registered methods; empty: the Elastic-Net geometries below
    geometries: tuple[str, ...] = ("original", "modified")
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # for every method that takes --alpha
    options: dict = field(default_factory=dict)  # grid values of other options: {"percdamp": [0.01, 0.1]}
    reconstruct: tuple[bool, ...] = (False,)  # (False, True): mask-only methods also with --reconstruct
    sparsities: tuple[float, ...] = (0.5,)
    patterns: tuple[str, ...] = ("unstructured",)  # "unstructured" uses the sparsities; "2:4" is 50% by itself
    seeds: int = 1  # calibration draws (seed, seed + 1, ...); each configuration is pruned once per draw
    keep: bool = False  # keep the pruned checkpoints (else deleted once evaluated)
    grid: dict = field(default_factory=dict)  # values of any field below: {"nsamples": [64, 128], "seqlen": [512, 2048]}
    # calibration: one set per draw, the same for every configuration
    calib: str = "wikitext103"
    nsamples: int = 128
    calib_seqlen: int = 2048
    seed: int = 0
    stat_norm: str = "mean"
    budgets: str = "uniform"  # per-block sparsities: uniform or owl (its owl_m, owl_lambda through `options`)
    # evaluation: the same for the dense model and every configuration
    ppl: str | None = "wikitext103"
    ppl_slices: int | None = None
    seqlen: int = 2048
    max_windows: int | None = None
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    data_dir: str | None = None
    include_path: str | None = None  # lm-eval tasks: a folder of task YAMLs
    num_fewshot: int | None = None  # lm-eval tasks: examples per prompt (the task's own default if None)
    # where and how the blocks run
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 4

    GRID = ("methods", "geometries", "alphas", "options", "reconstruct", "sparsities", "patterns", "seeds", "keep", "grid")

    def __post_init__(self):
        for name in ("methods", "alphas", "geometries", "sparsities", "patterns", "tasks", "reconstruct"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "ppl", _field_value("ppl", self.ppl))  # --ppl none: the tasks alone, as in a grid
        object.__setattr__(self, "grid", {name: tuple(_field_value(name, v) for v in _listed(values))
                                          for name, values in dict(self.grid).items()})
        gridded = [f.name for f in dataclasses.fields(self) if f.name not in self.GRID and f.name != "seed"]
        for name, values in self.grid.items():
            if name not in gridded:
                axis = {"seed": "seeds"}.get(name, name)
                raise StreamPruneError(
                    f"the sweep's grid cannot vary {name!r}" + (f" (it is an axis of its own: {axis})" if name in self.GRID or name == "seed" else "")
                    + f"; it varies {', '.join(gridded)}"
                )
            if not values:
                raise StreamPruneError(f"the sweep's grid gives no value for {name!r}")
        object.__setattr__(self, "options", {k: tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in dict(self.options).items()})
        unknown = [g for g in self.geometries if g not in GEOMETRIES]
        if unknown:
            raise StreamPruneError(f"unknown geometry {unknown[0]!r}; choose from {', '.join(GEOMETRIES)}")
        for name in self.methods:
            get_method(name)
        known = {o.name for m in METHODS.values() for o in m.options} | {o.name for o in OBS_OPTIONS + OWL_OPTIONS}
        for name in self.options:
            if name not in known or name == "alpha":
                raise StreamPruneError(f"unknown option {name!r} in the sweep's options; known: {', '.join(sorted(known - {'alpha'}))} (alpha: --alphas)")
        for pattern in self.patterns:
            if pattern != "unstructured":
                parse_pattern(pattern)
        if self.seeds < 1:
            raise StreamPruneError(f"--seeds must be at least 1, got {self.seeds}")
        if not self.points():
            if self.budgets == "owl" and "unstructured" not in self.patterns:
                raise StreamPruneError(f"the grid is empty: --budgets owl gives each block a sparsity of its own, which an N:M pattern "
                                       f"({', '.join(self.patterns)}) fixes at N/M; give sparsities, or --budgets uniform")
            raise StreamPruneError("the grid is empty: give methods (or geometries), alphas, and sparsities or patterns")
        self.eval_config()  # validates the evaluation options
        for point in self.points():
            point.prune_config(self, calib="unused", seed=self.seed)  # validates every option and the rest
        if self.grid:
            for setting in self.settings():
                self.at(setting)  # validates each setting's values

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
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.GRID and k not in self.grid}

    def settings(self) -> list[dict]:
        """Every combination of the `grid` values, in the order given ([{}] without a grid)."""
        names = list(self.grid)
        return [dict(zip(names, values)) for values in itertools.product(*(self.grid[n] for n in names))]

    def at(self, setting: dict) -> "SweepSpec":
        """This spec with one setting's values and no grid of fields."""
        return dataclasses.replace(self, grid={}, **setting)

    def method_names(self) -> tuple[str, ...]:
        return self.methods or tuple(GEOMETRIES[g] for g in self.geometries)

    def points(self) -> list["GridPoint"]:
        """Every configuration of the grid: per sparsity or pattern, per method, with and without
        reconstruction (mask-only methods only), over the values of the options the method takes."""
        shapes = [(s, None) for s in self.sparsities] if "unstructured" in self.patterns else []
        if self.budgets != "owl":  # OWL's budgets are sparsities; an N:M pattern has one (config.py refuses it)
            shapes += [(parse_pattern(p)[0] / parse_pattern(p)[1], p) for p in self.patterns if p != "unstructured"]
        points = []
        for (sparsity, pattern), name in itertools.product(shapes, self.method_names()):
            method = get_method(name)
            for rebuilt in self.reconstruct:
                if rebuilt and method.updates_weights:
                    continue  # it updates its weights itself
                takes = list(method.options) + [o for o in OBS_OPTIONS if rebuilt and o not in method.options]
                takes += list(OWL_OPTIONS) if self.budgets == "owl" else []
                axes = [self.alphas if o.name == "alpha" else self.options.get(o.name, (o.default,)) for o in takes]
                for values in itertools.product(*axes):
                    options = tuple((o.name, o.check(v)) for o, v in zip(takes, values))
                    points.append(GridPoint(name, options, float(sparsity), pattern, bool(rebuilt)))
        return points

    def draws(self) -> list[int]:
        """The calibration seeds: seed, seed + 1, ... (one per draw)."""
        return [self.seed + k for k in range(self.seeds)]

    def eval_config(self) -> EvalConfig:
        return EvalConfig(ppl=self.ppl, ppl_slices=self.ppl_slices, tasks=self.tasks, seqlen=self.seqlen,
                          max_windows=self.max_windows, limit=self.limit, data_dir=self.data_dir,
                          include_path=self.include_path, num_fewshot=self.num_fewshot,
                          device=self.device, dtype=self.dtype, batch_size=self.batch_size)


@dataclass(frozen=True)
class GridPoint:
    """One configuration of the grid: a method, the values of its options, a sparsity or pattern."""

    method: str
    options: tuple = ()  # ((name, value), ...): every option the method (and --reconstruct) takes
    sparsity: float = 0.5
    pattern: str | None = None
    reconstruct: bool = False

    @property
    def geometry(self) -> str | None:
        """'original' or 'modified' for the Elastic-Net methods (the paper's table), else None."""
        return next((g for g, m in GEOMETRIES.items() if m == self.method), None)

    @property
    def alpha(self) -> float | None:
        return dict(self.options).get("alpha")

    @property
    def shape(self) -> str:
        return self.pattern or f"{self.sparsity:g}"

    @property
    def label(self) -> str:
        shape = self.pattern or f"{self.sparsity:.0%}"
        rebuilt = " + reconstruct" if self.reconstruct else ""
        if self.geometry:
            return f"EN-{self.geometry.capitalize()} a={self.alpha:g}{rebuilt} {shape}"
        defaults = {o.name: o.default for o in [*get_method(self.method).options, *OBS_OPTIONS, *OWL_OPTIONS]}
        changed = " ".join(f"{k}={option_text(v)}" for k, v in self.options if v != defaults.get(k))
        return f"{self.method}{' ' + changed if changed else ''}{rebuilt} {shape}"

    @property
    def prune_key(self) -> str:
        """The same name for configurations that prune identically (both geometries at alpha = 1)."""
        shape = self.pattern.replace(":", "of") if self.pattern else f"s{self.sparsity:g}"
        rebuilt = "-rec" if self.reconstruct else ""
        if self.geometry:
            geometry = "modified" if self.alpha == 1 else self.geometry
            others = "".join(f"-{k}{option_text(v)}" for k, v in self.options if k != "alpha")
            return f"{geometry}-a{self.alpha:g}{others}{rebuilt}-{shape}"
        return f"{self.method}{''.join(f'-{k}{option_text(v)}' for k, v in self.options)}{rebuilt}-{shape}"

    def prune_config(self, spec: SweepSpec, calib: str, seed: int) -> PruneConfig:
        return PruneConfig.of(
            method=self.method, sparsity=self.sparsity, pattern=self.pattern, reconstruct=self.reconstruct,
            calib=calib, nsamples=spec.nsamples, seqlen=spec.calib_seqlen, seed=seed, stat_norm=spec.stat_norm, budgets=spec.budgets,
            device=spec.device, dtype=spec.dtype, batch_size=spec.batch_size, **dict(self.options),
        )


def _per_draw(name: str, seed: int, spec: SweepSpec) -> str:
    """A file or folder name for one draw; the first draw keeps the plain name (sweeps before --seeds)."""
    return name if seed == spec.seed else f"{name}-seed{seed}"


def _ids_file(outdir: Path, seed: int, spec: SweepSpec, suffix: str = "") -> Path:
    """The calibration ids of one draw and calibration setting (`suffix`: _suffix of CALIBRATION_FIELDS)."""
    if seed == spec.seed and not suffix:
        return outdir / CALIBRATION_IDS_FILE
    draw = f"-seed{seed}" if seed != spec.seed else ""
    return outdir / f"calibration_ids{draw}{suffix}.safetensors"


def _open_sweep(outdir: Path, model_dir: Path, spec: SweepSpec, overwrite: bool) -> OutputLock:
    """A new sweep directory, or an earlier one with the same fixed options (the grid may differ), locked
    for this sweep (state.OutputLock: the same sweep started twice is refused); returns the lock, held.
    Raises StreamPruneError for a directory that holds something else, or a sweep of other settings
    (without overwrite), or that another run holds."""
    recorded_path = outdir / SPEC_FILE
    if outdir.exists() and not outdir.is_dir():
        raise StreamPruneError(f"sweep output {outdir} is a file; give a directory")
    check_writable(outdir, f"to sweep directory {outdir}")
    lock = OutputLock(outdir, model_dir)
    try:
        _reuse_or_replace(outdir, recorded_path, model_dir, spec, overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


def _reuse_or_replace(outdir: Path, recorded_path: Path, model_dir: Path, spec: SweepSpec, overwrite: bool) -> None:
    """_open_sweep's choice, in the locked directory: the earlier sweep kept, or emptied (not removed, so
    that the lock on it holds on), and this one's settings recorded."""
    current = {**spec.fixed(), "model_fingerprint": input_fingerprint(model_dir)}
    if outdir.exists() and any(outdir.iterdir()):
        if not recorded_path.is_file():
            if not overwrite:
                raise StreamPruneError(f"{outdir} is not empty and holds no sweep; pass --overwrite to replace it")
            make_output(outdir)
        else:
            recorded = json.loads(recorded_path.read_text())
            # a setting a sweep from an earlier version did not record had its default then
            defaults = {f.name: f.default for f in dataclasses.fields(SweepSpec) if f.default is not dataclasses.MISSING}
            changed = [k for k, v in current.items() if _as_json(recorded.get(k, defaults.get(k))) != _as_json(v)]
            # a sweep that stopped before any result (a bad input found late: a task name, the device, an
            # offline corpus) protects nothing; its calibration draws are of the old settings and go with it
            done = [p for folder in ("results", "checkpoints") if (outdir / folder).is_dir() for p in (outdir / folder).iterdir()]
            if changed and not overwrite and done:
                k = changed[0]
                what = "the model" if k == "model_fingerprint" else f"--{k.replace('_', '-')}"
                raise StreamPruneError(
                    f"{outdir} holds a sweep with other settings ({what} differs); "
                    "rerun with the same settings to continue it, or pass --overwrite to start over"
                )
            if changed and overwrite:
                make_output(outdir)
            elif changed:  # nothing done yet: only what the sweep wrote goes, its settings and calibration draws
                log.warning("replacing the sweep in %s, which has no results yet, with these settings", outdir)
                for path in [recorded_path, *outdir.glob("calibration_ids*.safetensors")]:
                    path.unlink()
    outdir.mkdir(parents=True, exist_ok=True)
    write_json(recorded_path, current)


def _as_json(value):
    return json.loads(json.dumps(value))


def _metrics(result: dict) -> dict:
    """The numbers of one evaluated pruning (or of the dense model)."""
    evaluation = result["eval"]
    row = {}
    if "ppl" in evaluation:
        row["ppl"] = evaluation["ppl"]["value"]
        row["ppl_slices"] = evaluation["ppl"]["slices"]
        row["ppl_slices_mean"] = evaluation["ppl"]["slices_mean"]
    for task, metrics in evaluation.get("tasks", {}).items():
        if task != "macro_mean":
            row.update({f"{task}_{metric}": metrics[metric] for metric in table_metrics(task, metrics)})
    if evaluation.get("tasks", {}).get("macro_mean") is not None:
        row["macro_mean"] = evaluation["tasks"]["macro_mean"]
    row["prune_s"] = result.get("prune_s", 0.0)
    row["eval_s"] = evaluation["timings"]["total_s"]
    peaks = [result.get("prune_peak", {}), evaluation["peak_memory"]]  # each its own run's peak
    row["peak_host_rss_bytes"] = max(peak.get("host_rss_bytes", 0) for peak in peaks)
    if any("gpu_allocated_bytes" in peak for peak in peaks):
        row["peak_gpu_allocated_bytes"] = max(peak.get("gpu_allocated_bytes", 0) for peak in peaks)
    return row


SPREAD = ("ppl", "macro_mean")  # the metrics whose spread over draws is reported
# the keys of a row (_row, _metrics) that are not a task's metric: every other is one, whatever its name
# (lm-eval's exact_match, word_perplexity, a group's subtasks)
NOT_TASK_METRICS = frozenset({"label", "method", "geometry", "alpha", "reconstruct", "options", "sparsity", "pattern", "setting",
                              "failed", "seeds", "ppl", "ppl_slices", "ppl_slices_mean", "macro_mean", "prune_s", "eval_s",
                              "peak_host_rss_bytes", "peak_gpu_allocated_bytes"})


def _row(label: str, point: GridPoint | None, results: list[dict], setting: dict | None = None) -> dict:
    """One row: the configuration, and its metrics averaged over its draws (with the spread of SPREAD);
    with a grid of fields, its setting too."""
    row = {
        "label": f"{label} [{setting_label(setting)}]" if setting else label,
        "method": point and point.method,
        "geometry": point and point.geometry,
        "alpha": point and point.alpha,
        "reconstruct": point.reconstruct if point else None,
        "options": dict(point.options) if point else None,
        "sparsity": point.sparsity if point else 0.0,
        "pattern": (point.pattern or "unstructured") if point else None,
    }
    if setting:
        row["setting"] = _as_json(setting)
    failed = [result["failed"] for result in results if "failed" in result]
    if failed:  # no metrics: why is in the row instead
        return {**row, "failed": failed[0], "prune_s": None, "eval_s": None}
    draws = [_metrics(result) for result in results]
    for key, first in draws[0].items():
        values = [draw[key] for draw in draws]
        if isinstance(first, list):
            row[key] = [sum(column) / len(column) for column in zip(*values)]
        elif first is None:
            row[key] = None
        else:
            row[key] = sum(values) / len(values)
        if key in SPREAD and len(values) > 1:
            mean = row[key]
            row[f"{key}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            row[f"{key}_min"], row[f"{key}_max"], row[f"{key}_seeds"] = min(values), max(values), values
    if len(draws) > 1:
        row["seeds"] = len(draws)
    return row


@dataclass
class _PruneJob:
    """One pruning (a configuration, a draw, a pruning setting) and every evaluation made of it."""

    point: GridPoint
    spec: SweepSpec  # the setting's spec: its prune fields
    seed: int
    ids_file: Path
    checkpoint: Path
    evaluations: list = field(default_factory=list)  # (EvalConfig, result file)


def _prune_and_evaluate(model_dir: Path, job: _PruneJob, progress: bool, budget) -> None:
    """One configuration for one draw: pruned (resumed if interrupted), evaluated once per evaluation
    setting not yet done, each written to its result file; a NumericalError is recorded in each
    remaining result file as the configuration's failure."""
    todo = [(config, result_file) for config, result_file in job.evaluations if not result_file.is_file()]
    started = time.perf_counter()
    checkpoint = job.checkpoint
    try:
        earlier = RunManifest.load(checkpoint) if checkpoint.is_dir() else None
        if earlier is not None and earlier.status == "complete":
            manifest = earlier  # pruned before an interruption, not yet evaluated
        else:
            # an unfinished pruning from before a torch or transformers upgrade cannot resume bitwise
            resume = earlier is None or version_difference(earlier.versions, versions()) is None
            config = job.point.prune_config(job.spec, str(job.ids_file), job.seed)
            manifest = prune(model_dir, checkpoint, config, progress=progress, budget=budget, resume=resume)
        for eval_config, result_file in todo:
            evaluation = evaluate(checkpoint, eval_config, progress=progress, budget=budget)
            write_json(result_file, {
                "prune_s": manifest.timings["total_s"], "prune_peak": manifest.peak_memory, "eval": evaluation,
                "sparsity": manifest.config["sparsity"], "pattern": manifest.config["pattern"], "seed": job.seed,
                "elapsed_s": round(time.perf_counter() - started, 3),
            })
    except NumericalError as exc:  # this configuration's numbers, not the sweep's: record it and go on
        log.warning("%s failed: %s", job.point.label, exc)
        for _, result_file in todo:
            if not result_file.is_file():
                write_json(result_file, {"failed": one_line(exc), "seed": job.seed, "elapsed_s": round(time.perf_counter() - started, 3)})
    if not job.spec.keep and checkpoint.exists():
        shutil.rmtree(checkpoint)
        if not any(checkpoint.parent.iterdir()):
            checkpoint.parent.rmdir()


def run_sweep(model: str, outdir: str | Path, spec: SweepSpec, *, overwrite: bool = False, progress: bool = True,
              budget: Budget | None = None, echo=print) -> list[dict]:
    """Prunes and evaluates every configuration of `spec` (once per draw and setting) plus the dense
    model (once per evaluation setting); returns the result rows (per setting: the dense row first)."""
    outdir = Path(outdir)
    model_dir = resolve_model_dir(model)
    lock = _open_sweep(outdir, model_dir, spec, overwrite)
    try:
        return _run_grid(model_dir, outdir, spec, progress, budget, echo)
    finally:
        lock.release()


def _run_grid(model_dir: Path, outdir: Path, spec: SweepSpec, progress: bool, budget: Budget | None, echo) -> list[dict]:
    """run_sweep's work, in its locked directory."""
    results_dir = outdir / "results"
    results_dir.mkdir(exist_ok=True)
    settings = spec.settings()
    tokenizer = None
    patterns = [p for p in spec.patterns if p != "unstructured"]
    if patterns and any(spec.at(setting).budgets == "owl" for setting in settings):
        log.warning("--budgets owl gives each block a sparsity of its own, which an N:M pattern fixes at N/M: %s left out "
                    "where the budgets are owl", ", ".join(patterns))

    jobs: dict[str, _PruneJob] = {}
    for setting in settings:
        at = spec.at(setting)
        calibration, pruning, evaluation = (_suffix(setting, f) for f in (CALIBRATION_FIELDS, PRUNE_FIELDS, EVAL_FIELDS))
        # drawn only where a configuration runs blocks over it (magnitude alone needs no corpus)
        uses_calibration = any(p.prune_config(at, calib="unused", seed=at.seed).statistics for p in at.points())
        for seed in spec.draws() if uses_calibration else ():
            ids_file = _ids_file(outdir, seed, spec, calibration)
            if not ids_file.is_file():
                tokenizer = tokenizer or load_tokenizer(model_dir)
                save_windows(ids_file, calibration_windows(at.calib, tokenizer, at.nsamples, at.calib_seqlen, seed, progress))
        dense_file = results_dir / f"dense{evaluation}.json"
        if not dense_file.is_file():
            echo("Evaluating the dense model" + (f" [{setting_label({k: v for k, v in setting.items() if k in EVAL_FIELDS})}]" if evaluation else "") + " ...")
            write_json(dense_file, {"eval": evaluate(model_dir, at.eval_config(), progress=progress, budget=budget)})
        for point in {p.prune_key: p for p in at.points()}.values():
            for seed in spec.draws():
                name = _per_draw(point.prune_key, seed, spec) + pruning
                job = jobs.setdefault(name, _PruneJob(point, at, seed, _ids_file(outdir, seed, spec, calibration), outdir / "checkpoints" / name))
                job.evaluations.append((at.eval_config(), results_dir / f"{name}{_suffix(setting, EVAL_ONLY_FIELDS)}.json"))

    pending = [job for job in jobs.values() if any(not file.is_file() for _, file in job.evaluations)]
    for number, job in enumerate(pending, 1):
        draw = f", calibration seed {job.seed}" if spec.seeds > 1 else ""
        where = f" [{setting_label({k: getattr(job.spec, k) for k in spec.grid if k in PRUNE_FIELDS})}]" if any(k in PRUNE_FIELDS for k in spec.grid) else ""
        evaluations = sum(not file.is_file() for _, file in job.evaluations)
        also = f" ({evaluations} evaluation settings)" if evaluations > 1 else ""
        echo(f"[{number}/{len(pending)}] {job.point.label}{where}{draw}: pruning and evaluating{also} ...")
        _prune_and_evaluate(model_dir, job, progress, budget)

    rows = []
    for setting in settings:
        at = spec.at(setting)
        pruning, evaluation, only = _suffix(setting, PRUNE_FIELDS), _suffix(setting, EVAL_FIELDS), _suffix(setting, EVAL_ONLY_FIELDS)

        def results_of(point: GridPoint) -> list[dict]:
            files = [results_dir / f"{_per_draw(point.prune_key, seed, spec)}{pruning}{only}.json" for seed in spec.draws()]
            return [json.loads(file.read_text()) for file in files]

        rows.append(_row("dense", None, [json.loads((results_dir / f"dense{evaluation}.json").read_text())], setting))
        rows += [_row(point.label, point, results_of(point), setting) for point in at.points()]
    write_results(outdir, rows, spec)
    return rows


def write_results(outdir: Path, rows: list[dict], spec: SweepSpec) -> None:
    write_json(outdir / "results.json", {"spec": dataclasses.asdict(spec), "rows": rows})
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with (outdir / "results.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    settings = spec.settings()
    if len(settings) == 1:
        (outdir / "results.md").write_text(markdown_tables(rows, spec), encoding="utf-8")
        plot_results(outdir / "plots", rows)
        return
    parts = ["# Sweep results", "", f"A grid over {', '.join(spec.grid)}: a section per setting, each with its own "
             "dense row; plots in plots/<setting>/.", ""]
    for setting in settings:
        ours = [row for row in rows if row.get("setting") == _as_json(setting)]
        body = markdown_tables(ours, spec.at(setting)).split("\n", 2)[2]  # without its title
        parts += [f"# {setting_label(setting)}", "", body]
        plot_results(outdir / "plots" / _suffix(setting, tuple(setting)).lstrip("-"), ours)
    (outdir / "results.md").write_text("\n".join(parts), encoding="utf-8")


def _fmt(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _cell(row: dict, metric: str, digits: int) -> str:
    """A metric as a table cell: 'failed', the value, or with several draws 'mean ± std'."""
    if "failed" in row:
        return "failed"
    value = _fmt(row.get(metric), digits)
    spread = row.get(f"{metric}_std")
    return f"{value} ± {spread:.{digits}f}" if spread is not None else value


def _paper_geometries(spec: SweepSpec) -> list[str]:
    """The Elastic-Net geometries of the grid, in its order (the paper's table has a column pair each)."""
    names = spec.method_names()
    return [g for g in sorted(GEOMETRIES, key=lambda g: names.index(GEOMETRIES[g]) if GEOMETRIES[g] in names else 99)
            if GEOMETRIES[g] in names]


def markdown_tables(rows: list[dict], spec: SweepSpec) -> str:
    """Per sparsity or pattern: the paper's table for the Elastic-Net rows (alpha down, geometry across:
    ppl and macro accuracy), a table of the other configurations; then every metric of every row."""
    dense, pruned = rows[0], rows[1:]
    has_ppl, has_acc = "ppl" in dense, "macro_mean" in dense
    metrics = [("ppl", 2)] * has_ppl + [("macro_mean", 4)] * has_acc
    geometries = _paper_geometries(spec)
    lines = ["# Sweep results", ""]
    if has_ppl and dense.get("ppl_slices"):
        lines += [f"ppl: over all the windows of the {len(dense['ppl_slices'])} slices, pooled (exp of the mean token "
                  "NLL); each slice's perplexity and their mean are in results.csv.", ""]
    if spec.num_fewshot:
        lines += [f"lm-eval tasks: {spec.num_fewshot}-shot (--num-fewshot); the built-in tasks zero-shot.", ""]
    if spec.seeds > 1:
        lines += [f"Each configuration pruned with {spec.seeds} calibration draws (seeds {', '.join(map(str, spec.draws()))}): "
                  "mean ± standard deviation over the draws.", ""]
    for shape in dict.fromkeys((r["pattern"], r["sparsity"]) for r in pruned):
        group = [r for r in pruned if (r["pattern"], r["sparsity"]) == shape]
        title = f"{shape[1]:.0%} unstructured" if shape[0] == "unstructured" else f"{shape[0]} semi-structured"
        done = [r for r in group if "failed" not in r]
        best = None
        if done:
            best = min(done, key=lambda r: r["ppl"]) if has_ppl else max(done, key=lambda r: r["macro_mean"])
        lines += [f"## {title}", ""]

        def cells_of(row):
            mark = "**" if row is best else ""
            return [c if c == "failed" else f"{mark}{c}{mark}" for c in (_cell(row, m, d) for m, d in metrics)]

        paper = [r for r in group if r["geometry"] in geometries and not r["reconstruct"]]
        if paper:
            header = ["alpha"]
            for geometry in geometries:
                name = f"EN-{geometry.capitalize()}"
                header += [f"{name} ppl"] * has_ppl + [f"{name} macro acc"] * has_acc
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            dense_cells = ["dense (0%)"] + [_cell(dense, m, d) for m, d in metrics] * len(geometries)
            lines.append("| " + " | ".join(f"*{c}*" for c in dense_cells) + " |")
            for alpha in dict.fromkeys(r["alpha"] for r in paper):
                cells = [f"{alpha:g}"]
                for geometry in geometries:
                    row = next((r for r in paper if r["geometry"] == geometry and r["alpha"] == alpha), None)
                    cells += cells_of(row) if row else [""] * len(metrics)
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        others = [r for r in group if r not in paper]
        if others:
            header = ["configuration"] + [{"ppl": "ppl", "macro_mean": "macro acc"}[m] for m, _ in metrics]
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines.append("| " + " | ".join(f"*{c}*" for c in ["dense"] + [_cell(dense, m, d) for m, d in metrics]) + " |")
            lines += ["| " + " | ".join([r["label"]] + cells_of(r)) + " |" for r in others]
            lines.append("")
        lines += [f"Best pruned: **{best['label']}** (bold); dense in italics." if best else "Every configuration failed.", ""]
    metric_columns = list(dict.fromkeys(k for row in rows for k in row if k not in NOT_TASK_METRICS
                                        and not k.startswith(tuple(f"{m}_" for m in SPREAD)))) + ["macro_mean"] * has_acc
    lines += ["## Every configuration", "",
              "| configuration | " + " | ".join((["ppl"] if has_ppl else []) + metric_columns + ["prune s", "eval s"]) + " |",
              "|" + "---|" * (1 + has_ppl + len(metric_columns) + 2)]
    for row in rows:
        cells = [row["label"]] + ([_cell(row, "ppl", 2)] if has_ppl else [])
        cells += [_cell(row, c, 4) for c in metric_columns] + [_fmt(row["prune_s"], 0), _fmt(row["eval_s"], 0)]
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

    def draw(axis, points, metric, label):
        """A line through (x, row) points, with error bars when the rows have a spread over draws."""
        points = sorted(points, key=lambda p: p[0])
        spread = [row.get(f"{metric}_std") for _, row in points]
        errors = [e or 0.0 for e in spread] if any(e is not None for e in spread) else None
        axis.errorbar([x for x, _ in points], [row[metric] for _, row in points], yerr=errors, marker="o", capsize=3, label=label)

    metrics = [(m, label) for m, label in (("ppl", "perplexity"), ("macro_mean", "macro accuracy")) if m in dense]
    for pattern, sparsity in dict.fromkeys((r["pattern"], r["sparsity"]) for r in pruned):
        group = [r for r in pruned if (r["pattern"], r["sparsity"]) == (pattern, sparsity) and r["alpha"] is not None]
        if not group:
            continue
        shape = f"{sparsity:.0%} unstructured" if pattern == "unstructured" else pattern
        slug = f"s{sparsity:g}" if pattern == "unstructured" else pattern.replace(":", "of")
        for metric, label in metrics:
            figure, axis = plt.subplots(figsize=(6, 4))
            for line in dict.fromkeys(_line_name(r) for r in group):
                name = line.rsplit(" a=", 1)[0] + (" + reconstruct" if line.endswith(" + reconstruct") else "")
                draw(axis, [(r["alpha"], r) for r in group if _line_name(r) == line], metric, name)
            finish(figure, axis, f"{label.capitalize()} vs alpha, {shape}", label, "alpha (L1 share)",
                   f"{metric}_vs_alpha_{slug}.png", dense[metric])
    if "ppl" in dense:
        unstructured = [r for r in pruned if r["pattern"] == "unstructured"]
        figure, axis = plt.subplots(figsize=(6, 4))
        names = {id(r): _sparsity_line(r, unstructured) for r in unstructured}
        for line in dict.fromkeys(names.values()):
            points = [(0.0, dense)] + [(r["sparsity"], r) for r in unstructured if names[id(r)] == line]
            draw(axis, points, "ppl", line)
        finish(figure, axis, "Perplexity vs sparsity (dense at 0)", "perplexity", "sparsity", "ppl_vs_sparsity.png", dense["ppl"])
    return written


def _line_name(row: dict) -> str:
    """A row's configuration without its sparsity or pattern (or setting): 'EN-Modified a=0.5', 'sparsegpt + reconstruct'."""
    label = row["label"].rsplit(" [", 1)[0] if row.get("setting") else row["label"]
    return label.rsplit(" ", 1)[0]


def _sparsity_line(row: dict, rows: list[dict]) -> str:
    """The line of the perplexity-vs-sparsity plot a row belongs to: both geometries at alpha = 1 are one
    pruning, so one line, when both are in the grid."""
    both = {r["geometry"] for r in rows if r["alpha"] == 1 and r["reconstruct"] == row["reconstruct"]} >= set(GEOMETRIES)
    if row["geometry"] and row["alpha"] == 1 and both:
        return "a=1 (both geometries)" + (" + reconstruct" if row["reconstruct"] else "")
    return _line_name(row)
