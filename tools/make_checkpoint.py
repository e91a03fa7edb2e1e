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


def build_config(family: str, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, tie: bool, dtype: str):
    extra = {}
    if family in ("mistral", "qwen2", "qwen3"):
        extra["sliding_window"] = 8  # short enough that tests on a few dozen tokens exercise it
    if family in ("qwen2", "qwen3"):
        extra["use_sliding_window"] = True
        extra["max_window_layers"] = 1  # layers from this index on use the sliding window
    return AutoConfig.for_model(
        family,
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=tie,
        bos_token_id=256,
        eos_token_id=257,
        dtype=dtype,
        **extra,
    )


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
    tie_embeddings: bool = False,
    max_shard_bytes: int = 2**30,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(family, layers, hidden, intermediate, heads, kv_heads, vocab, tie_embeddings, dtype)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters(remove_duplicate=True)}
    if tie_embeddings:
        shapes.pop("lm_head.weight", None)
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
    parser.add_argument("--family", default="llama", choices=["llama", "mistral", "qwen2", "qwen3"])
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
