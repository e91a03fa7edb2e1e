"""Reaching the Hugging Face Hub for datasets: at once from the cache when the Hub cannot be reached.

Offline, `datasets.load_dataset` of a Hub dataset retries each request five times with growing waits
(huggingface_hub's http_backoff: about 24 s per dataset with datasets 5.2 and huggingface_hub 2.4) before
it fails, or before it falls back to a copy in its cache.  One short request to the Hub first tells
whether it can be reached; when it cannot, the loads inside `datasets_from_cache_when_offline` run in the
libraries' own offline mode (as under HF_HUB_OFFLINE=1): a cached copy at once, else a prompt failure
whose message names the reason.
"""

from __future__ import annotations

import contextlib
import logging

from .errors import one_line

log = logging.getLogger("streamprune")

PROBE_TIMEOUT_S = 3.0
_UNREACHABLE: dict[str, str | None] = {}  # endpoint -> why it could not be reached (None: it could), per process


def unreachable_reason(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub cannot be reached, as one line ('[Errno -2] Name or service not known'), or None when it
    answered: one HEAD request to huggingface_hub's endpoint (HF_ENDPOINT) through its own HTTP session
    (its proxies and headers), timing out after timeout_s seconds; an answer with a 5xx status counts as
    unreachable.  Asked once per process and endpoint.  None without asking when huggingface_hub is in
    offline mode (HF_HUB_OFFLINE=1): then nothing is requested anyway."""
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode():
        return None
    endpoint = constants.ENDPOINT
    if endpoint not in _UNREACHABLE:
        try:
            status = get_session().head(endpoint, timeout=timeout_s).status_code
            _UNREACHABLE[endpoint] = f"{endpoint} answered with HTTP status {status}" if status >= 500 else None
        except Exception as exc:  # no route, no name, refused, timed out, a proxy's refusal: all unreachable
            _UNREACHABLE[endpoint] = f"{endpoint}: {one_line(exc) or type(exc).__name__}"
    return _UNREACHABLE[endpoint]


@contextlib.contextmanager
def datasets_from_cache_when_offline():
    """For the length of the block, when the Hub cannot be reached (unreachable_reason), huggingface_hub and
    datasets are in their offline mode, as if HF_HUB_OFFLINE=1 had been set before they were imported:
    `datasets.load_dataset` of a Hub dataset reads the copy in datasets' cache at once (with datasets'
    warning that it does) or raises its ConnectionError ("Couldn't reach ... (OfflineModeIsEnabled)") at
    once, instead of retrying for about 24 s.  Their flags are restored afterwards.  Yields the reason
    (str) when the Hub was unreachable, else None, for the caller's error message."""
    reason = unreachable_reason()
    if reason is None:
        yield None
        return
    import datasets.config
    from huggingface_hub import constants

    # the libraries read these module flags on every request (constants.is_offline_mode, datasets.load);
    # environment variables would be too late, being read when they are imported
    saved = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    log.info("the Hugging Face Hub cannot be reached (%s): datasets are read from datasets' cache only", reason)
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def unreachable_note(reason: str | None) -> str:
    """'the Hugging Face Hub is unreachable (REASON) and datasets' cache has no copy' for an error message
    after a failed load inside datasets_from_cache_when_offline, or '' when the Hub was reachable."""
    return f"the Hugging Face Hub is unreachable ({reason}) and datasets' cache has no copy" if reason else ""
