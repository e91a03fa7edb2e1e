"""Small text slices bundled with streamprune so the demo and tests run offline (see README.md here)."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
WIKITEXT_CALIBRATION = DATA_DIR / "wikitext2_test_slice.raw"  # calibration text for the demo and tests
WIKITEXT_HELD_OUT = DATA_DIR / "wikitext2_valid_slice.raw"  # held apart: perplexity only
