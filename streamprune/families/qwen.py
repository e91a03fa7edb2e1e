"""Qwen2 (attention biases) and Qwen3 (q/k norms, per-layer full or sliding attention)."""

from . import Family

FAMILY = Family(name="qwen", model_types=("qwen2", "qwen3"))
