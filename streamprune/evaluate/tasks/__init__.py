"""Zero-shot multiple-choice tasks, scored by the log-likelihood of each answer after its prompt.

Conventions follow lm-evaluation-harness so numbers are comparable: the answer is appended to the
prompt after a space; trailing spaces of a prompt move to the answer; prompt and prompt+answer are
tokenized without special tokens and the answer's tokens are those past the prompt's; a prompt longer
than the model's context is cut from the left.  `acc` takes the answer with the highest summed
log-likelihood, `acc_norm` the highest log-likelihood per UTF-8 byte of the answer text.

A task is one small file here defining TASK; its `load(data_dir)` reads the offline copy (the layout of
the project's shared data folder) when data_dir is given, else the Hugging Face hub via datasets.
"""

from __future__ import annotations

import importlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ...errors import StreamPruneError
from ...hub import datasets_from_cache_when_offline, failure
from ..loglikelihood import Request

TARGET_DELIMITER = " "
LIMIT_SEED = 1234


@dataclass(frozen=True)
class Example:
    prompt: str
    choices: tuple[str, ...]  # answer texts, without the delimiter
    gold: int


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[Path | None], list[Example]]
    primary: str = "acc"  # the metric that enters the macro mean
    describe: Callable[[list[Example]], dict] = field(default=lambda examples: {})


_TASK_MODULES = ("boolq", "hellaswag", "phishing")


def all_tasks() -> dict[str, Task]:
    tasks = (importlib.import_module(f"{__name__}.{name}").TASK for name in _TASK_MODULES)
    return {task.name: task for task in tasks}


def get_task(name: str) -> Task:
    tasks = all_tasks()
    if name not in tasks:
        raise StreamPruneError(f"unknown task {name!r}; choose from {', '.join(tasks)}")
    return tasks[name]


def subset(examples: list[Example], limit: int | None, seed: int = LIMIT_SEED) -> list[Example]:
    """A fixed, seeded subset of `limit` examples, in their original order (all when limit is None)."""
    if limit is None or limit >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of the context and of the continuation as lm-evaluation-harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids) :]


def requests_for(examples: list[Example], tokenizer, max_length: int) -> list[Request]:
    """One request per (example, choice), in order; contexts cut from the left to fit max_length."""
    requests = []
    for example in examples:
        for choice in example.choices:
            context_ids, answer_ids = encode_pair(tokenizer, example.prompt, TARGET_DELIMITER + choice)
            if not context_ids:
                context_ids = [tokenizer.eos_token_id]
            tokens = (context_ids + answer_ids)[-(max_length + 1) :]
            requests.append(Request(tuple(tokens), start=len(tokens) - len(answer_ids)))
    return requests


def accuracy(examples: list[Example], logprobs: list[torch.Tensor]) -> dict:
    """acc and acc_norm over the examples, from each request's answer-token log-probabilities."""
    correct = correct_norm = 0
    position = 0
    for example in examples:
        sums = [logprobs[position + i].sum().item() for i in range(len(example.choices))]
        position += len(example.choices)
        per_byte = [s / len(c.encode("utf-8")) for s, c in zip(sums, example.choices)]
        correct += max(range(len(sums)), key=sums.__getitem__) == example.gold
        correct_norm += max(range(len(per_byte)), key=per_byte.__getitem__) == example.gold
    n = len(examples)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


def read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise StreamPruneError(f"{what} data {path} is missing; check --data-dir")
    return path.read_text(encoding="utf-8").splitlines()


def from_hub(loader: Callable[[], list[Example]], name: str, files: str) -> list[Example]:
    """loader()'s examples, read from the Hugging Face Hub through datasets (at once from datasets' cache
    when the Hub cannot be reached: hub.datasets_from_cache_when_offline).  Raises StreamPruneError
    naming the task, why, and the --data-dir layout of its offline copy (`files`), when they cannot be loaded."""
    with datasets_from_cache_when_offline() as offline:
        try:
            return loader()
        except StreamPruneError:
            raise
        except Exception as exc:
            raise StreamPruneError(f"could not load {name} from the Hugging Face Hub ({failure(exc, offline)}); offline, pass "
                                   f"--data-dir DIR holding its copy as DIR/{files}") from exc
