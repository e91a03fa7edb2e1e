#!/usr/bin/env python3
"""streamprune's lm-eval backend (StreamedLM) against lm-eval's own Hugging Face backend (HFLM).

On SmolLM2-135M (the demo checkpoint), CPU, the same BoolQ and HellaSwag examples as local lm-eval YAML
tasks (the first N of each: the project's shared data folder when there, else tests/data), each run in a
fresh child process through lm_eval.simple_evaluate, so wall time and peak RSS are the run's own
(wall time from the child's start, lm-eval's import and task building included; scoring time, the part
spent inside the model's request methods, is the backend's own work):
  hf          HFLM(pretrained=DIR, dtype=D, batch_size=B): the whole model in memory
  streamed    StreamedLM(pretrained=DIR, dtype=D, batch_size=B): one block resident, shared contexts
  unshared    the same without sharing contexts (each ending re-runs its context)
It prints a table of the metrics (they must agree), wall time, peak RSS and the token positions through each
block (StreamedLM's work, HFLM's first decoder layer counted the same way: rows x columns, padding
included; the work apart from the machine's speed) with ratios to hf, and the fewest positions any exact
evaluation of the requests computes (their distinct prefixes, work.Work.least), and writes JSON.  The target (issue 15): streamed at most 0.5x hf's time.  --tasks hellaswag runs HellaSwag
alone (the task whose contexts are shared); --tasks boolq_fewshot runs BoolQ with three examples before
each question, the first three documents before every question (lm-eval's first_n sampler, as MMLU's
five; the first three see themselves among them, as lm-eval leaves a question's own document out only
of examples from its test split), whose prompts share their examples; --tasks boolq_gen_fewshot
answers the same by greedy generation (until a newline or a period, 8 tokens at most; exact match),
whose prompts' shared start greedy generation reads once; --tasks boolq_gen_sampled samples the same
answers 8 times each (do_sample, temperature 0.7, lm-eval's repeats; the majority answer scored, as
gsm8k-cot-self-consistency scores its 64), where the backends draw differently, so their metrics are
not compared; --runs chooses the runs (hf,streamed,unshared by default); --dtype bfloat16 runs both
backends in bfloat16, where their metrics may differ by rounding (batches of other shapes).

  python benchmarks/lmeval_backend.py --limit 200 --json benchmarks/results/lmeval_backend_cpu.json
  python benchmarks/lmeval_backend.py --limit 200 --tasks hellaswag --json benchmarks/results/lmeval_backend_hellaswag_cpu.json
  python benchmarks/lmeval_backend.py --limit 200 --tasks boolq_fewshot --json benchmarks/results/lmeval_backend_fewshot_cpu.json
  python benchmarks/lmeval_backend.py --limit 200 --tasks boolq_gen_fewshot --json benchmarks/results/lmeval_backend_generative_cpu.json
  python benchmarks/lmeval_backend.py --limit 25 --tasks boolq_gen_sampled --runs hf,streamed --json benchmarks/results/lmeval_backend_sampled_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from child import ROOT, run_script

GIB = 2**30

RUN = r"""
import json, sys, time
started = time.perf_counter()
import lm_eval
from lm_eval.tasks import TaskManager
kind, model_dir, tasks_dir, limit, batch, dtype, tasks = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7].split(",")
if kind == "hf":
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=model_dir, device="cpu", dtype=dtype, batch_size=batch)
else:
    from streamprune.evaluate.harness import StreamedLM
    lm = StreamedLM(pretrained=model_dir, device="cpu", dtype=dtype, batch_size=batch, progress=False, share_contexts=kind == "streamed")
scoring = [0.0]  # seconds inside the model's request methods: the backend's own work


def timed(method):
    def run(*args, **kwargs):
        begun = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            scoring[0] += time.perf_counter() - begun
    return run


for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):  # lm-eval calls them by name
    setattr(lm, name, timed(getattr(lm, name)))
import contextlib, types
from streamprune.evaluate.work import Work, counting
counted = Work()  # HFLM: token positions through its first decoder layer, counted as StreamedLM's work counts block 0's
with counting(types.SimpleNamespace(blocks=lm.model.model.layers), counted) if kind == "hf" else contextlib.nullcontext():
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=tasks_dir),
                                  limit=limit, bootstrap_iters=0)
from streamprune.state import peak_rss_bytes
metrics = {f"{t} {k.removesuffix(',none')}": v for t, r in out["results"].items() for k, v in r.items()
           if "," in k and "stderr" not in k and isinstance(v, (int, float))}  # a filter's (maj@8) too
work = lm.work.as_dict() if kind != "hf" else {"positions": counted.positions}
print(json.dumps({"wall_s": time.perf_counter() - started, "scoring_s": scoring[0], "peak_rss_bytes": peak_rss_bytes(), "metrics": metrics,
                  "work": work}))
"""

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
{prompt}metric_list:
{metrics}"""
BOOLQ = """doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"
doc_to_target: "{{ ['false', 'true'].index(label) }}"
doc_to_choice: ["no", "yes"]
"""
HELLASWAG = """doc_to_text: "{{ctx}}"
doc_to_target: label
doc_to_choice: "{{endings}}"
"""


FEWSHOT = """include: bench_boolq.yaml
task: bench_boolq_fewshot
fewshot_split: validation
num_fewshot: 3
fewshot_config:
  sampler: first_n
"""
# BoolQ answered by greedy generation, with the same three examples first: a generative few-shot task (as
# gsm8k-CoT, TriviaQA or NQ-Open with their examples), whose prompts share the examples' tokens
GENERATIVE = """task: bench_boolq_gen_fewshot
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
fewshot_split: validation
num_fewshot: 3
fewshot_config:
  sampler: first_n
output_type: generate_until
doc_to_text: "{{{{passage}}}}\\nQuestion: {{{{question}}}}?\\nAnswer:"
doc_to_target: "{{{{ 'yes' if label == 'true' else 'no' }}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
    regexes_to_ignore: [" "]
"""

# the same, sampled 8 times per question and scored by the majority answer (self-consistency)
SAMPLED = """include: bench_boolq_gen_fewshot.yaml
task: bench_boolq_gen_sampled
repeats: 8
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: true
  temperature: 0.7
filter_list:
  - name: maj@8
    filter:
      - function: majority_vote
      - function: take_first
"""


def write_tasks(workdir: Path, limit: int) -> Path:
    """The task YAMLs (BoolQ, the same with three examples first, HellaSwag) and their data (HellaSwag's 6-line text form as JSON lines) under workdir."""
    shared = ROOT.parent / "shared" / "data"
    source = shared if (shared / "boolq" / "val.jsonl").is_file() else ROOT / "tests" / "data"
    tasks = workdir / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    lines = (source / "hellaswag" / "hellaswag_val_full.txt").read_text(encoding="utf-8").splitlines()
    rows = []
    for i in range(0, min(len(lines), 6 * limit), 6):
        context, label, *endings = lines[i : i + 6]
        rows.append({"ctx": context, "label": int(label), "endings": endings})
    (tasks / "hellaswag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tasks / "bench_boolq.yaml").write_text(TASK.format(name="bench_boolq", data=source / "boolq" / "val.jsonl", prompt=BOOLQ,
                                                        metrics="  - metric: acc\n"), encoding="utf-8")
    (tasks / "bench_hellaswag.yaml").write_text(TASK.format(name="bench_hellaswag", data=tasks / "hellaswag.jsonl", prompt=HELLASWAG,
                                                            metrics="  - metric: acc\n  - metric: acc_norm\n"), encoding="utf-8")
    (tasks / "bench_boolq_fewshot.yaml").write_text(FEWSHOT, encoding="utf-8")
    (tasks / "bench_boolq_gen_fewshot.yaml").write_text(GENERATIVE.format(data=source / "boolq" / "val.jsonl"), encoding="utf-8")
    (tasks / "bench_boolq_gen_sampled.yaml").write_text(SAMPLED, encoding="utf-8")
    return tasks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lmeval-bench"))
    parser.add_argument("--limit", type=int, default=200, help="examples per task")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tasks", default="boolq,hellaswag",
                        help="boolq, hellaswag, boolq_fewshot, boolq_gen_fewshot, boolq_gen_sampled, or several (comma-separated)")
    parser.add_argument("--runs", default="hf,streamed,unshared", help="which of hf, streamed, unshared (comma-separated; hf first)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="both backends compute in it (the demo checkpoint is stored in float32)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from streamprune.demo import smollm2_checkpoint

    model_dir = smollm2_checkpoint()
    tasks = write_tasks(args.workdir, args.limit)
    names = ",".join(f"bench_{name.strip()}" for name in args.tasks.split(","))
    runs = {}
    kinds = [kind.strip() for kind in args.runs.split(",")]
    if kinds[0] != "hf" or not set(kinds) <= {"hf", "streamed", "unshared"}:
        parser.error("--runs: hf first, then streamed and/or unshared")
    for kind in kinds:
        runs[kind] = run_script(RUN, kind, model_dir, tasks, args.limit, args.batch_size, args.dtype, names)
        print(f"{kind:10s} {runs[kind]['wall_s']:8.1f} s  {runs[kind]['peak_rss_bytes'] / GIB:6.2f} GiB", flush=True)
    base = runs["hf"]
    print(f"\n{'run':10s} {'wall s':>8s} {'x hf':>6s} {'scoring s':>10s} {'x hf':>6s} {'peak GiB':>9s} {'x hf':>6s} "
          f"{'positions':>10s} {'x hf':>6s}  metrics")
    for kind, run in runs.items():
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(run["metrics"].items()))
        print(f"{kind:10s} {run['wall_s']:8.1f} {run['wall_s'] / base['wall_s']:6.2f} {run['scoring_s']:10.1f} "
              f"{run['scoring_s'] / base['scoring_s']:6.2f} {run['peak_rss_bytes'] / GIB:9.2f} "
              f"{run['peak_rss_bytes'] / base['peak_rss_bytes']:6.2f} {run['work']['positions']:10d} "
              f"{run['work']['positions'] / base['work']['positions']:6.2f}  {metrics}")
    ours = runs.get("streamed") or runs.get("unshared")
    alone, least = ours["work"]["alone"], ours["work"]["least"]
    print(f"\npositions: token positions through each block (the first decoder layer's calls, padding included), the "
          f"work apart from the machine's speed; the requests take {alone} read one by one, without padding, and "
          f"{least} at the least ({least / base['work']['positions']:.2f}x hf: each distinct prefix once, unpadded, "
          f"the fewest any exact evaluation of them computes)")
    sampled = "bench_boolq_gen_sampled" in names
    agree = all(abs(run["metrics"][k] - base["metrics"][k]) < 1e-9 for run in runs.values() for k in base["metrics"])
    print(f"\nmetrics identical across the runs: {agree}" + (" (sampled: the backends draw differently, not compared)" if sampled else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"limit": args.limit, "batch_size": args.batch_size, "dtype": args.dtype, "tasks": names, "model": "SmolLM2-135M-Instruct",
                                         "machine": platform.processor() or platform.machine(), "runs": runs,
                                         "metrics_agree": agree}, indent=2) + "\n")
    return 0 if agree or sampled else 1


if __name__ == "__main__":
    sys.exit(main())
