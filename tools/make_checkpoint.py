#!/usr/bin/env python3
"""Write a random-weight Hugging Face checkpoint of any shape, one tensor at a time.

Tiny ones serve the unit tests; LLaMA-2-7B-shaped ones (--preset llama2-7b) the memory benchmarks.
Shards are cut by size in tensor order, so with a small --max-shard-bytes a block's tensors land in
several files (as in real sharded checkpoints).  Only one shard's worth of tensors is ever in memory.
The checkpoint gets a byte-level tokenizer (256 byte tokens plus <s> and </s>, no merges), so text
calibration works on it.

  python tools/make_checkpoint.py OUT --family llama --layers 2 --hidden 64 --intermediate 128 \
      --heads 4 --kv-heads 2 --vocab 512 --dtype float32 --max-shard-bytes 40000
  python tools/make_checkpoint.py OUT --preset llama2-7b --layers 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

PRESETS = {
    "tiny": dict(hidden=64, intermediate=160, heads=4, kv_heads=2, vocab=512),
    "llama2-7b": dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


# What each family's tiny config sets beyond the shape, so that the tests exercise what makes it
# different: sliding windows short enough for a few dozen tokens, local/global layers, logit and
# embedding scales, layers without rotary embeddings, OPT's projections around the blocks.
FAMILY_SETTINGS = {
    "llama": {},
    "mistral": dict(sliding_window=8),
    "qwen2": dict(sliding_window=8, use_sliding_window=True, max_window_layers=1),
    "qwen3": dict(sliding_window=8, use_sliding_window=True, max_window_layers=1),
    "gemma": {},
    "gemma2": dict(sliding_window=8, final_logit_softcapping=3.0, attn_logit_softcapping=5.0, query_pre_attn_scalar=16),
    "gemma3_text": dict(sliding_window=8, sliding_window_pattern=2, final_logit_softcapping=3.0, query_pre_attn_scalar=16),
    "phi3": dict(sliding_window=8),
    "olmo2": {},
    "granite": dict(embedding_multiplier=6.0, logits_scaling=4.0, residual_multiplier=0.5, attention_multiplier=0.2),
    "cohere": dict(logit_scale=0.5, use_qk_norm=True),
    "stablelm": dict(partial_rotary_factor=0.25, use_qkv_bias=True),
    "starcoder2": dict(sliding_window=8, use_bias=True),
    "smollm3": dict(no_rope_layer_interval=2),
    "opt": dict(word_embed_proj_dim=32, enable_bias=True),
    "gpt_neox": dict(rotary_pct=0.25, use_parallel_residual=True),
}
FAMILIES = sorted([*FAMILY_SETTINGS, "gemma3"])


def _per_layer(family: str, layers: int, extra: dict) -> dict:
    """Per-layer settings that depend on the number of layers."""
    if family == "gemma3_text":  # local, global, local, ...: both kinds in three layers
        return dict(layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    if family == "smollm3":  # 1 = rotary embeddings, 0 = none (every second layer), as SmolLM3 does every fourth
        return dict(no_rope_layers=[int((i + 1) % extra["no_rope_layer_interval"] != 0) for i in range(layers)])
    return {}


def build_config(family: str, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                 tie: bool | None, dtype: str):
    """A config of `family` with the given shape; `tie` None keeps the family's own default for tied embeddings."""
    if family == "gemma3":  # the multimodal checkpoint: a tiny SigLIP tower, the text side as gemma3_text
        text = build_config("gemma3_text", layers, hidden, intermediate, heads, kv_heads, vocab, tie, dtype)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
        extra = {} if tie is None else dict(tie_word_embeddings=tie)
        return AutoConfig.for_model(
            "gemma3", text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4,
            boi_token_index=258, eoi_token_index=259, image_token_index=260, dtype=dtype, **extra,
        )
    extra = dict(FAMILY_SETTINGS[family])
    extra.update(_per_layer(family, layers, extra))
    if tie is not None:
        extra["tie_word_embeddings"] = tie
    return AutoConfig.for_model(
        family,
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        ffn_dim=intermediate,  # OPT's name for it
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        vocab_size=vocab,
        max_position_embeddings=4096 if family != "opt" else 256,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=257,
        dtype=dtype,
        **extra,
    )


def hub_names(model) -> dict[str, str]:
    """{tensor name in the model: name in a checkpoint on the hub}, as save_pretrained writes them
    (transformers reverts its loading-time renamings: Pythia's embed_out, Gemma 3's language_model.model)."""
    from transformers.core_model_loading import revert_weight_conversion

    state = model.state_dict()
    reverted = revert_weight_conversion(model, dict(state))
    by_tensor = {id(tensor): name for name, tensor in reverted.items()}
    return {name: by_tensor.get(id(tensor), name) for name, tensor in state.items()}


def random_tensor(name: str, shape: tuple, generator: torch.Generator, device: str) -> torch.Tensor:
    """Norm weights near 1, everything else N(0, 0.02^2) like transformers' initialisation."""
    if len(shape) == 1 and "norm" in name:
        return 1.0 + 0.1 * torch.randn(shape, generator=generator, device=device)
    return 0.02 * torch.randn(shape, generator=generator, device=device)


def make_random_checkpoint(
    out: str | Path,
    family: str = "llama",
    layers: int = 2,
    hidden: int = 64,
    intermediate: int = 160,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 512,
    dtype: str = "float32",
    tie_embeddings: bool | None = False,
    max_shard_bytes: int = 2**30,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(family, layers, hidden, intermediate, heads, kv_heads, vocab, tie_embeddings, dtype)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    names = hub_names(skeleton)
    tied = skeleton.get_expanded_tied_weights_keys(all_submodels=True)
    state = {names[name]: t for name, t in skeleton.state_dict().items() if name not in tied}
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    generator = torch.Generator(device=device).manual_seed(seed)

    shards: list[dict[str, torch.Tensor]] = [{}]
    weight_map: dict[str, int] = {}
    shard_bytes, total_bytes = 0, 0
    tmp_names: list[Path] = []

    def flush():
        name = out / f".shard-{len(tmp_names):05d}.tmp"
        save_file(shards[0], name, metadata={"format": "pt"})
        tmp_names.append(name)
        shards[0] = {}

    for name, shape in shapes.items():
        if state[name].device.type != "meta":  # a persistent buffer: its value is the model's own
            tensor = state[name].clone()
        else:
            tensor = random_tensor(name, shape, generator, device).to(DTYPES[dtype]).cpu()
        size = tensor.numel() * tensor.element_size()
        if shards[0] and shard_bytes + size > max_shard_bytes:
            flush()
            shard_bytes = 0
        shards[0][name] = tensor
        weight_map[name] = len(tmp_names)
        shard_bytes += size
        total_bytes += size
    flush()

    total = len(tmp_names)
    if total == 1:
        tmp_names[0].rename(out / "model.safetensors")
    else:
        files = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        for tmp, final in zip(tmp_names, files):
            tmp.rename(out / final)
        index = {"metadata": {"total_size": total_bytes}, "weight_map": {k: files[i] for k, i in weight_map.items()}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out)
    byte_level_tokenizer().save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--family", default="llama", choices=FAMILIES)
    parser.add_argument("--layers", type=int, default=2)
    for name in ("hidden", "intermediate", "heads", "kv-heads", "vocab"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--tie-embeddings", action="store_true")
    parser.add_argument("--max-shard-bytes", type=int, default=2**30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda is faster)")
    args = parser.parse_args()
    shape = dict(PRESETS[args.preset])
    for key in shape:
        value = getattr(args, key)
        if value is not None:
            shape[key] = value
    out = make_random_checkpoint(
        args.out, args.family, args.layers, dtype=args.dtype, tie_embeddings=args.tie_embeddings,
        max_shard_bytes=args.max_shard_bytes, seed=args.seed, device=args.device, **shape,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
