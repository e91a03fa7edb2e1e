"""One walker over the decoder blocks, for pruning, for replaying written blocks on resume, and for
evaluation.

Blocks are materialised on the device one at a time, in order, and freed after each visit.  With
read_ahead, block i+1's tensors are read from disk in a background thread while block i is at work:
that pays on CUDA, where reading and GPU work overlap; on a CPU the read competes with the compute for
the same cores and holds a second block in memory (measured: benchmarks/README.md), so there it is off.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

from torch import nn

from .blocks import DecoderStack
from .checkpoint import CheckpointReader


class BlockWalker:
    """Visits blocks in order with one resident at a time; a context manager (its reading thread stops)."""

    def __init__(self, stack: DecoderStack, read_ahead: bool):
        self.stack = stack
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamprune-read") if read_ahead else None

    def blocks(self, indices: Iterable[int], reader_for: Callable[[int], CheckpointReader] | None = None) -> Iterator[tuple[int, nn.Module]]:
        """Yields (index, block) for each index: the block loaded from reader_for(index) (default: the
        model's reader) in the compute dtype, freed once the visit is over (also when it raised)."""
        indices = list(indices)
        ahead: Future | None = None
        for position, index in enumerate(indices):
            reader = reader_for(index) if reader_for else None
            stored = ahead.result() if ahead is not None else None
            ahead = None
            if self.pool is not None and position + 1 < len(indices):
                following = indices[position + 1]
                ahead = self.pool.submit(self.stack.read_block, following, reader_for(following) if reader_for else None)
            block = self.stack.load_block(index, reader=reader, stored=stored)
            del stored
            try:
                yield index, block
            finally:
                self.stack.free_block(index)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def __enter__(self) -> "BlockWalker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
