"""streamprune: prune decoder-only language models one block at a time (Wanda, Elastic-Net Wanda, SparseGPT)."""

__version__ = "0.1.0"

from .config import PruneConfig  # noqa: E402
from .engine import prune  # noqa: E402
from .errors import NumericalError, StreamPruneError  # noqa: E402

__all__ = ["NumericalError", "PruneConfig", "StreamPruneError", "prune", "__version__"]
