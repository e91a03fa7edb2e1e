"""Phishing detection on URLs (Hannousse & Yahiouche 2021, "Web page phishing detection dataset").

Prompt (ours; the paper does not publish one):

    URL: {url}
    Is this URL legitimate or phishing?
    Answer:

answered " legitimate" or " phishing".  Offline: the url/status CSV of the shared data folder;
online: the same dataset on the hub (pirocheto/phishing-url).
"""

from __future__ import annotations

import csv
from pathlib import Path

from ...errors import StreamPruneError
from . import Example, Task, from_hub

ANSWERS = ("legitimate", "phishing")
CSV_FILE = "dataset_phishing_url_status.csv"


def example(url: str, status: str) -> Example:
    return Example(prompt=f"URL: {url}\nIs this URL legitimate or phishing?\nAnswer:", choices=ANSWERS, gold=ANSWERS.index(status))


def load(data_dir: Path | None) -> list[Example]:
    if data_dir is None:
        def hub():
            import datasets

            rows = datasets.load_dataset("pirocheto/phishing-url", split="train+test")
            return [example(r["url"], r["status"]) for r in rows]

        return from_hub(hub, "phishing", f"phishing/{CSV_FILE}")
    path = Path(data_dir) / "phishing" / CSV_FILE
    if not path.is_file():
        raise StreamPruneError(f"phishing data {path} is missing; check --data-dir")
    examples = []
    with path.open(encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle), 2):  # line 1 is the header
            if row.get("url") is None or row.get("status") not in ANSWERS:
                raise StreamPruneError(
                    f"phishing {path} line {number}: expected a url and a status of legitimate or phishing, "
                    f"got {row.get('status')!r}"
                )
            examples.append(example(row["url"], row["status"]))
    return examples


def describe(examples: list[Example]) -> dict:
    return {"share_phishing": sum(e.gold for e in examples) / len(examples)}


TASK = Task(name="phishing", load=load, primary="acc", describe=describe)
