"""Running a benchmark's baseline in a fresh Python process, so its peak memory is its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args) -> dict:
    """Runs `python -c script args...` with the repository importable; its last line of output, as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])
