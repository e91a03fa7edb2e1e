"""Runs the streamprune CLI and stops itself at a chosen point, as a crash, kill -9 or Ctrl-C would.

  python tests/kill_at.py POINT N prune MODEL OUT [options...]

POINT (N counts calls from 1):
  before_first_block  SIGKILL once the manifest and calibration ids exist, before block 0
  run_block           SIGKILL inside the N-th forward pass over a block (mid-block)
  write_shard         SIGKILL while the N-th shard is being written (a partial temporary file exists)
  after_block         SIGKILL right after the manifest records N blocks done (between blocks)
  before_index        SIGKILL after every shard is written, before the index (the final writes)
  sigint_after_block  SIGINT (Ctrl-C) right after the manifest records N blocks done
"""

import os
import signal
import sys

import streamprune.blocks
import streamprune.checkpoint
import streamprune.engine
import streamprune.state
from streamprune.cli import main

point, n = sys.argv[1], int(sys.argv[2])
calls = {"count": 0}


def kill(sig=signal.SIGKILL):
    sys.stdout.flush()
    os.kill(os.getpid(), sig)


def counted(original, on_call):
    def wrapper(*args, **kwargs):
        calls["count"] += 1
        return on_call(original, calls["count"], *args, **kwargs)

    return wrapper


if point == "before_first_block":
    streamprune.engine.prune_block = lambda *a, **k: kill()
elif point == "run_block":
    original = streamprune.blocks.DecoderStack.run_block
    streamprune.blocks.DecoderStack.run_block = counted(
        original, lambda f, count, *a, **k: kill() if count == n else f(*a, **k)
    )
elif point == "write_shard":
    original = streamprune.checkpoint.save_file

    def partial_then_kill(f, count, tensors, path, *a, **k):
        if count == n:
            with open(path, "wb") as handle:
                handle.write(b"\x00" * 100)
            kill()
        return f(tensors, path, *a, **k)

    streamprune.checkpoint.save_file = counted(original, partial_then_kill)
elif point in ("after_block", "sigint_after_block"):
    original = streamprune.state.RunManifest.save

    def save_then_stop(self, out_dir):
        original(self, out_dir)
        if self.blocks_done == n and self.status == "running":
            kill(signal.SIGKILL if point == "after_block" else signal.SIGINT)

    streamprune.state.RunManifest.save = save_then_stop
elif point == "before_index":
    streamprune.checkpoint.CheckpointWriter.write_index = lambda self: kill()
else:
    raise SystemExit(f"unknown point {point}")

main(sys.argv[3:])
