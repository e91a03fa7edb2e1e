"""Evaluation of (pruned) checkpoints with the same block streaming as pruning.

    from streamprune.evaluate import evaluate
    results = evaluate("path/to/model", ppl="wikitext103", tasks=("boolq", "hellaswag"), limit=200)
"""

from .runner import EvalConfig, evaluate, format_table

__all__ = ["EvalConfig", "evaluate", "format_table"]
