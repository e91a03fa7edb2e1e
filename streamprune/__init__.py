"""streamprune: prune decoder-only language models one block at a time (Wanda, Elastic-Net Wanda, SparseGPT)."""

__version__ = "0.1.0"

from .config import PruneConfig  # noqa: E402
from .errors import NumericalError, StreamPruneError  # noqa: E402

__all__ = ["NumericalError", "PruneConfig", "StreamPruneError", "prune", "__version__"]


def __getattr__(name: str):
    # prune is imported when first asked for (PEP 562): it brings transformers (a second or more), which
    # the command line's --help and its refusals of bad options do not need
    if name == "prune":
        from .engine import prune

        return prune
    raise AttributeError(f"module 'streamprune' has no attribute {name!r}")
