"""Model families: which architectures streamprune knows, and where their decoder blocks live.

The maths of every block is transformers' own decoder-layer class for the config; a family only says
where the stack of blocks sits in the model and under which checkpoint prefix its tensors are stored.
A new family is one small file in this folder that defines FAMILY and is listed in _FAMILY_MODULES.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import StreamPruneError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    base_model: str = "model"  # attribute of the *ForCausalLM that embeds and loops over the blocks
    blocks: str = "layers"  # attribute of the base model holding the nn.ModuleList of blocks
    final_norm: str = "norm"  # attribute of the base model applied after the last block

    def block_prefix(self, index: int) -> str:
        """Checkpoint prefix of block `index`, with its trailing dot: 'model.layers.3.'."""
        return f"{self.base_model}.{self.blocks}.{index}."

    @property
    def base_prefix(self) -> str:
        return f"{self.base_model}."


_FAMILY_MODULES = ("llama", "mistral", "qwen")


def all_families() -> list[Family]:
    return [importlib.import_module(f"{__name__}.{name}").FAMILY for name in _FAMILY_MODULES]


def supported_model_types() -> list[str]:
    return sorted(t for family in all_families() for t in family.model_types)


def family_for(model_type: str) -> Family:
    for family in all_families():
        if model_type in family.model_types:
            return family
    raise StreamPruneError(
        f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported_model_types())}"
    )
