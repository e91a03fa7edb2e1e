"""LLaMA 1/2/3 and the models that reuse its architecture (SmolLM, SmolLM2, TinyLlama, ...)."""

from . import Family

FAMILY = Family(name="llama", model_types=("llama",))
