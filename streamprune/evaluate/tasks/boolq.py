"""BoolQ (Clark et al. 2019), dev split in its SuperGLUE packaging: yes/no questions about a passage."""

from __future__ import annotations

import json
from pathlib import Path

from . import Example, Task, from_hub, read_lines

ANSWERS = ("no", "yes")


def example(passage: str, question: str, answer: bool) -> Example:
    return Example(prompt=f"{passage}\nQuestion: {question}?\nAnswer:", choices=ANSWERS, gold=int(answer))


def _truth(label) -> bool:
    return label in (True, 1, "true", "True")


def load(data_dir: Path | None) -> list[Example]:
    if data_dir is None:
        def hub():
            import datasets

            rows = datasets.load_dataset("aps/super_glue", "boolq", split="validation")
            return [example(r["passage"], r["question"], r["label"] == 1) for r in rows]

        return from_hub(hub, "boolq")
    rows = [json.loads(line) for line in read_lines(Path(data_dir) / "boolq" / "val.jsonl", "BoolQ") if line.strip()]
    return [example(r["passage"], r["question"], _truth(r.get("label", r.get("answer")))) for r in rows]


def describe(examples: list[Example]) -> dict:
    return {"share_yes": sum(e.gold for e in examples) / len(examples)}


TASK = Task(name="boolq", load=load, primary="acc", describe=describe)
