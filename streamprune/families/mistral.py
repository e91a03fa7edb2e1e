"""Mistral: LLaMA blocks with optional sliding-window attention (the mask comes from transformers)."""

from . import Family

FAMILY = Family(name="mistral", model_types=("mistral",))
