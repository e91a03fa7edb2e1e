"""BoolQ (Clark et al. 2019), dev split in its SuperGLUE packaging: yes/no questions about a passage."""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import StreamPruneError
from . import Example, Task, from_hub, read_lines

ANSWERS = ("no", "yes")


def example(passage: str, question: str, answer: bool) -> Example:
    return Example(prompt=f"{passage}\nQuestion: {question}?\nAnswer:", choices=ANSWERS, gold=int(answer))


def _truth(label) -> bool:
    if label in (True, 1, "true", "True"):
        return True
    if label in (False, 0, "false", "False"):
        return False
    raise ValueError(f"label {label!r} is neither true nor false")


def load(data_dir: Path | None) -> list[Example]:
    if data_dir is None:
        def hub():
            import datasets

            rows = datasets.load_dataset("aps/super_glue", "boolq", split="validation")
            return [example(r["passage"], r["question"], r["label"] == 1) for r in rows]

        return from_hub(hub, "boolq", "boolq/val.jsonl")
    path = Path(data_dir) / "boolq" / "val.jsonl"
    examples = []
    for number, line in enumerate(read_lines(path, "BoolQ"), 1):
        if line.strip():
            try:
                row = json.loads(line)
                examples.append(example(row["passage"], row["question"], _truth(row.get("label", row.get("answer")))))
            except (ValueError, KeyError, TypeError) as exc:
                raise StreamPruneError(
                    f"BoolQ {path} line {number}: expected JSON with passage, question and a true/false label ({exc})"
                ) from exc
    return examples


def describe(examples: list[Example]) -> dict:
    return {"share_yes": sum(e.gold for e in examples) / len(examples)}


TASK = Task(name="boolq", load=load, primary="acc", describe=describe)
