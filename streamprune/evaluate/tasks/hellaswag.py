"""HellaSwag (Zellers et al. 2019), validation: pick the sensible ending of a situation (4 choices).

Online, the harness's preprocessing is applied to the original fields: the context is
ctx_a + " " + ctx_b.capitalize(), prefixed by the activity label, and WikiHow markers are cleaned.
Offline, the 6-line text form (context line, gold label, 4 endings) lost the ctx_a/ctx_b split; its
text is already cleaned, and the fragment after the context's last ". " gets a capital first letter,
which is what capitalize() does to the usual lowercase ctx_b ("he", "the lady").
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import StreamPruneError
from . import Example, Task, from_hub, read_lines

TEXT_FILE = "hellaswag_val_full.txt"


def preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def capitalise_last_fragment(context: str) -> str:
    head, sep, tail = context.rpartition(". ")
    if tail and tail[0].islower():
        return head + sep + tail[0].upper() + tail[1:]
    return context


def load(data_dir: Path | None) -> list[Example]:
    if data_dir is None:
        def hub():
            import datasets

            rows = datasets.load_dataset("Rowan/hellaswag", split="validation")
            return [
                Example(
                    prompt=preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize()),
                    choices=tuple(preprocess(e) for e in r["endings"]),
                    gold=int(r["label"]),
                )
                for r in rows
            ]

        return from_hub(hub, "hellaswag", f"hellaswag/{TEXT_FILE}")
    path = Path(data_dir) / "hellaswag" / TEXT_FILE
    lines = read_lines(path, "HellaSwag")
    examples = []
    if len(lines) % 6:
        raise StreamPruneError(f"HellaSwag {path} has {len(lines)} lines, not groups of 6 (context, label, 4 endings)")
    for i in range(0, len(lines), 6):
        context, label, *endings = lines[i : i + 6]
        if not label.strip().isdigit() or int(label) >= len(endings):
            raise StreamPruneError(f"HellaSwag {path} line {i + 2}: the label must be 0 to 3, got {label!r}")
        examples.append(
            Example(
                prompt=capitalise_last_fragment(preprocess(context)),
                choices=tuple(preprocess(e) for e in endings),
                gold=int(label),
            )
        )
    return examples


TASK = Task(name="hellaswag", load=load, primary="acc_norm")
