"""Reaching the Hugging Face Hub for datasets: at once from the cache when the Hub cannot be reached.

Offline, `datasets.load_dataset` of a Hub dataset retries each request five times with growing waits
(huggingface_hub's http_backoff: about 24 s per dataset with datasets 5.2 and huggingface_hub 2.4) before
it fails, or before it falls back to a copy in its cache.  Inside `datasets_from_cache_when_offline`, the
first load of a Hub dataset first asks the Hub once whether it can be reached; when it cannot,
huggingface_hub is put in its offline mode (as under HF_HUB_OFFLINE=1) for the rest of the block, so
datasets reads its cached copy at once, or fails at once, and the caller's error names the reason.
Datasets from local files or from other hosts' URLs are loaded as before, and nothing is asked when no
Hub dataset is loaded.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import one_line

log = logging.getLogger("streamprune")

PROBE_TIMEOUT_S = 3.0
PROBE_KEPT_S = 300.0  # how long an answer stands: a network that comes back is noticed
_PROBED: dict[str, tuple[float, str | None]] = {}  # endpoint -> (when, why it could not be reached; None: it could)


def unreachable_reason(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub cannot be reached, as one line ('https://huggingface.co: [Errno -2] Name or service not
    known'), or None when it answered: one HEAD request to huggingface_hub's endpoint (HF_ENDPOINT) through
    its own HTTP session (its proxies and headers), with a timeout of timeout_s seconds (name resolution
    may add to it); an answer with a 5xx status counts as unreachable.  The answer stands for
    PROBE_KEPT_S seconds per endpoint.  None without asking when huggingface_hub is already in offline
    mode (HF_HUB_OFFLINE=1): then nothing is requested anyway."""
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return None
    endpoint = constants.ENDPOINT
    asked = _PROBED.get(endpoint)
    if asked is None or time.monotonic() - asked[0] > PROBE_KEPT_S:
        try:
            status = get_session().head(endpoint, timeout=timeout_s).status_code
            reason = f"{endpoint} answered with HTTP status {status}" if status >= 500 else None
        except Exception as exc:  # no route, no name, refused, timed out, a proxy's refusal: all unreachable
            reason = f"{endpoint}: {one_line(exc) or type(exc).__name__}"
        asked = _PROBED[endpoint] = (time.monotonic(), reason)
    return asked[1]


def is_hub_dataset(path) -> bool:
    """Whether datasets.load_dataset(path) reads a Hub dataset: neither one of datasets' packaged builders
    (json, csv, parquet, text, ...: local or remote data_files) nor a local file or folder."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    text = str(path)
    return text not in _PACKAGED_DATASETS_MODULES and "://" not in text and not Path(text).expanduser().exists()


@dataclass
class Offline:
    """What datasets_from_cache_when_offline found: `reason`, why the Hub could not be reached, once a Hub
    dataset was asked for and it could not (None otherwise)."""

    reason: str | None = None


_LOCK = threading.RLock()
_ACTIVE: list = []  # [Offline, the original load_dataset, the offline flag before] while a block is open
_depth = 0


@contextlib.contextmanager
def datasets_from_cache_when_offline():
    """For the length of the block, the first `datasets.load_dataset` of a Hub dataset (is_hub_dataset) asks
    whether the Hub can be reached (unreachable_reason); when it cannot, huggingface_hub is in its offline
    mode for the rest of the block (its module flag, which it reads on every request; the HF_HUB_OFFLINE
    variable would be too late, being read at import), so datasets reads a Hub dataset's copy in its
    cache at once, with its warning that it does, or raises its ConnectionError ("Couldn't reach ...")
    at once, instead of retrying for about 24 s.  Yields an Offline whose `reason` says so, for the
    caller's error message.  Blocks may nest, and be opened by several threads: the first opened installs
    the check and the last closed restores datasets.load_dataset and the flag; they share one Offline."""
    global _depth
    import datasets
    from huggingface_hub import constants

    with _LOCK:
        if _depth == 0:
            original = datasets.load_dataset
            state = Offline()

            def load_dataset(path, *args, **kwargs):
                if state.reason is None and not constants.is_offline_mode() and is_hub_dataset(path):
                    reason = unreachable_reason()
                    if reason is not None:
                        state.reason = reason
                        constants.HF_HUB_OFFLINE = True
                        log.info("the Hugging Face Hub cannot be reached (%s): datasets are read from datasets' cache only", reason)
                return original(path, *args, **kwargs)

            _ACTIVE[:] = [state, original, constants.HF_HUB_OFFLINE]
            datasets.load_dataset = load_dataset
        _depth += 1
        state = _ACTIVE[0]
    try:
        yield state
    finally:
        with _LOCK:
            _depth -= 1
            if _depth == 0:
                _, datasets.load_dataset, constants.HF_HUB_OFFLINE = _ACTIVE
                _ACTIVE.clear()


def unreachable_note(reason: str | None) -> str:
    """'the Hugging Face Hub is unreachable (REASON) and datasets' cache has no copy' for an error message
    after a failed load inside datasets_from_cache_when_offline, or '' when the Hub was reachable."""
    return f"the Hugging Face Hub is unreachable ({reason}) and datasets' cache has no copy" if reason else ""


def failure(exc: BaseException, offline: Offline) -> str:
    """Why a load of a Hub dataset inside datasets_from_cache_when_offline failed, for an error message
    that names the Hub: 'unreachable: REASON; datasets' cache has no copy' for datasets' ConnectionError
    while the Hub was unreachable, else the exception's type and message."""
    if offline.reason is not None and isinstance(exc, ConnectionError):
        return f"unreachable: {offline.reason}; datasets' cache has no copy"
    return f"{type(exc).__name__}: {one_line(exc)[:200]}"
