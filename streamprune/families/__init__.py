"""Model families: where a model's decoder blocks are, derived from the model transformers builds.

Nothing here is a list of architectures to keep up to date.  For the model transformers builds from a
config (on the meta device):

- the decoder is transformers' `get_decoder()` (the module that embeds the tokens and loops over the
  blocks: `model` for LLaMA, `model.decoder` for OPT, `gpt_neox` for Pythia, `model.language_model`
  for Gemma 3's multimodal checkpoints);
- the blocks are the one `nn.ModuleList` of `num_hidden_layers` modules directly under it;
- the checkpoint name of each tensor is the one transformers itself reads it from: its key renamings
  (`transformers.conversion_mapping`, the code `from_pretrained` runs) map, for example, Pythia's
  `embed_out.weight` to `lm_head.weight` and Gemma 3's `language_model.model.layers.N` to
  `model.language_model.layers.N`.  streamprune reads and writes each tensor under its stored name.

The structure is refused, naming the part that did not fit, when a block holds a weight that is not an
`nn.Linear` (GPT-2's Conv1D, fused mixture-of-experts tensors), when its tensors are stored in a form
transformers has to convert while loading (merged expert weights), or when the blocks cannot be found:
a model is never pruned in part.  TESTED lists the model types the suite checks end to end; others
whose structure fits are pruned too, with a warning.  A family file in this folder would hold only what
cannot be derived; none is needed for the families below.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from torch import nn

from ..errors import StreamPruneError

log = logging.getLogger("streamprune")

# model_type -> what the tests exercise; `streamprune families` and the README print this table.
TESTED: dict[str, str] = {
    "llama": "LLaMA 1-3, SmolLM/SmolLM2, TinyLlama",
    "mistral": "Mistral (sliding-window attention)",
    "qwen2": "Qwen2/2.5 (attention biases, sliding window from a layer on)",
    "qwen3": "Qwen3 (q/k norms)",
    "gemma": "Gemma (embedding normaliser, tied head)",
    "gemma2": "Gemma 2 (local/global layers, attention and final logit softcapping)",
    "gemma3_text": "Gemma 3 text-only checkpoints, 1B (local/global layers, q/k norms)",
    "gemma3": "Gemma 3 multimodal checkpoints, 4B and up (language blocks pruned, vision tower copied)",
    "phi3": "Phi-3/3.5/4-mini (fused qkv_proj and gate_up_proj)",
    "olmo2": "OLMo 2 (norms after attention and MLP, q/k norms)",
    "granite": "Granite 3 (embedding, residual, attention and logit multipliers)",
    "cohere": "Command-R (parallel block, LayerNorm, logit scale)",
    "stablelm": "StableLM 2 (LayerNorm, partial rotary, qkv biases)",
    "starcoder2": "StarCoder2 (LayerNorm, biases, c_fc/c_proj, sliding window)",
    "smollm3": "SmolLM3 (layers without rotary embeddings)",
    "opt": "OPT (learned positions with their offset, final layer norm inside the decoder, projections)",
    "gpt_neox": "Pythia, GPT-NeoX (parallel residual, fused query_key_value, embed_out)",
}


@dataclass(frozen=True)
class Layout:
    """Where the decoder and its blocks are, in the model (module paths) and in the checkpoint (names).

    `names` maps the model's tensor names (as in `model.state_dict()`) to the names the checkpoint
    stores them under, for every tensor the checkpoint holds.
    """

    model_type: str
    decoder: str  # module path of the module that embeds and loops over the blocks, '' for the model itself
    blocks: str  # module path of the nn.ModuleList of blocks: 'model.layers'
    num_blocks: int
    checkpoint_blocks: str  # stored-name prefix of every block tensor, with its trailing dot: 'model.layers.'
    names: dict[str, str] = field(compare=False, repr=False)

    def block_prefix(self, index: int) -> str:
        """Stored-name prefix of block `index`, with its trailing dot: 'model.layers.3.'."""
        return f"{self.checkpoint_blocks}{index}."

    def module_prefix(self, index: int) -> str:
        """Module path of block `index` in the model, with its trailing dot."""
        return f"{self.blocks}.{index}."

    def is_block_key(self, key: str) -> bool:
        return key.startswith(self.checkpoint_blocks)

    def stored_name(self, model_name: str) -> str:
        """The checkpoint's name for a model tensor (its own name when the checkpoint lacks it)."""
        return self.names.get(model_name, model_name)


def _module_path(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def _find_blocks(model: nn.Module, model_type: str, num_blocks: int) -> tuple[str, str]:
    """(decoder path, blocks path); StreamPruneError naming what is missing."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, ValueError, NotImplementedError) as exc:
        raise StreamPruneError(f"cannot find the decoder of {type(model).__name__} ({model_type}): {exc}") from exc
    decoder_path = _module_path(model, decoder)
    lists = [(name, child) for name, child in decoder.named_children() if isinstance(child, nn.ModuleList)]
    fitting = [name for name, child in lists if len(child) == num_blocks]
    if len(fitting) != 1:
        found = ", ".join(f"{name} ({len(child)})" for name, child in lists) or "none"
        raise StreamPruneError(
            f"cannot find the decoder blocks of {model_type}: {type(decoder).__name__} should hold one "
            f"nn.ModuleList of num_hidden_layers = {num_blocks} blocks; it holds {found}"
        )
    return decoder_path, f"{decoder_path}.{fitting[0]}" if decoder_path else fitting[0]


def _check_block(block: nn.Module, where: str, model_type: str) -> None:
    """Refuses blocks whose weights are not nn.Linear's: transformers' Conv1D (GPT-2 style, stored
    transposed) and fused mixture-of-experts tensors (3-D) would be left dense or misread.  Two-dimensional
    norm weights (Cohere's per-head q/k norms) are fine: they are copied, not pruned."""
    for module_name, module in block.named_modules():
        full = f"{where}.{module_name}" if module_name else where
        if type(module).__name__ == "Conv1D" or isinstance(module, nn.modules.conv._ConvNd):
            raise StreamPruneError(
                f"{model_type} is not supported: {full}.weight belongs to a {type(module).__name__}, not an "
                "nn.Linear; streamprune prunes nn.Linear weights only"
            )
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() >= 3:
                raise StreamPruneError(
                    f"{model_type} is not supported: {full}.{param_name} is a fused mixture-of-experts tensor "
                    f"{list(param.shape)}; streamprune prunes dense decoders (nn.Linear weights) only"
                )
    if not any(isinstance(m, nn.Linear) for m in block.modules()):
        raise StreamPruneError(f"{model_type} is not supported: block {where} has no nn.Linear layers to prune")


def _conversions(model: nn.Module):
    """transformers' key renamings and converters for this model, as from_pretrained applies them."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # a transformers without key conversions stores every tensor under its own name
        return [], []
    conversions = get_model_conversion_mapping(model)
    return ([c for c in conversions if isinstance(c, WeightRenaming)],
            [c for c in conversions if isinstance(c, WeightConverter)])


def stored_names(model: nn.Module, keys) -> tuple[dict[str, str], dict[str, str]]:
    """({model name: stored name}, {stored name: model name} of the tensors transformers would convert
    (merge, split) rather than only rename)."""
    renamings, converters = _conversions(model)
    if not renamings and not converters:
        return {key: key for key in keys}, {}
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    names, converted = {}, {}
    # in the loader's order (some renamings depend on it), and like the loader keeping a key that the
    # renaming would send outside the model when the model has it as it is
    for key in sorted(keys, key=dot_natural_key):
        name, converter = rename_source_key(key, renamings, converters, prefix, expected)
        if name not in expected and key in expected:
            name, converter = key, None
        if converter is not None:
            converted[key] = name
        names.setdefault(name, key)
    return names, converted


def derive_layout(model: nn.Module, config, keys) -> Layout:
    """The Layout of `model` (built by transformers, any device) for a checkpoint holding `keys`.

    Raises StreamPruneError naming the part that does not fit: no decoder or block list, a block weight
    that is not an nn.Linear, block tensors transformers must convert on loading, or block tensors
    stored under names that are not one prefix plus the module's own names.
    """
    model_type = config.model_type
    num_blocks = config.get_text_config().num_hidden_layers
    decoder, blocks = _find_blocks(model, model_type, num_blocks)
    for index, block in enumerate(model.get_submodule(blocks)):  # dense first blocks may precede expert ones
        _check_block(block, f"{blocks}.{index}", model_type)
    names, converted = stored_names(model, keys)
    in_blocks = [key for key, name in converted.items() if name.startswith(f"{blocks}.")]
    if in_blocks:
        raise StreamPruneError(
            f"{model_type} is not supported: transformers converts block tensors such as {in_blocks[0]} while "
            "loading (merged or split weights, e.g. mixture-of-experts); streamprune prunes them as stored only"
        )
    prefixes = set()
    for name, stored in names.items():
        if name.startswith(f"{blocks}."):
            index, _, rest = name[len(blocks) + 1 :].partition(".")
            if not stored.endswith(f".{index}.{rest}") and stored != f"{index}.{rest}":
                raise StreamPruneError(
                    f"{model_type} is not supported: block tensor {name} is stored as {stored}, which is not "
                    "a prefix followed by the block's own tensor names"
                )
            prefixes.add(stored[: len(stored) - len(f"{index}.{rest}")])
    if len(prefixes) > 1:
        raise StreamPruneError(f"{model_type}: the checkpoint stores blocks under several prefixes: {', '.join(sorted(prefixes))}")
    checkpoint_blocks = prefixes.pop() if prefixes else f"{blocks}."
    if model_type not in TESTED:
        log.warning(
            "model type %r is not among the tested families (streamprune families lists them); its blocks were "
            "found at %s and will be pruned, but check the result with streamprune eval", model_type, blocks,
        )
    return Layout(model_type, decoder, blocks, num_blocks, checkpoint_blocks, names)


def block_index(layout: Layout, key: str) -> int | None:
    """The block a stored tensor name belongs to, or None."""
    if not layout.is_block_key(key):
        return None
    head = key[len(layout.checkpoint_blocks) :].split(".", 1)[0]
    return int(head) if re.fullmatch(r"\d+", head) else None
