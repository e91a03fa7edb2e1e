"""`streamprune-lm-eval`: lm-evaluation-harness's own command line, with the `streamprune` model registered.

    streamprune-lm-eval --model streamprune --model_args pretrained=DIR,device=cuda,dtype=auto --tasks hellaswag

streamprune declares StreamedLM in lm-eval's plugin group `lm_eval.models` (setup.cfg), so an lm-eval that
discovers plugins (its main branch since EleutherAI/lm-evaluation-harness#4013) runs `lm_eval --model
streamprune` itself.  lm-eval 0.4.13 (the current release) has no such discovery: it finds models only in its
own source tree or among classes already imported when its command runs.  This command imports streamprune's
backend (streamprune.evaluate.harness.StreamedLM, registered as "streamprune") and then runs lm-eval's
command unchanged, so every option of `lm_eval` works as documented there, with either kind of lm-eval; it
also prints streamprune's errors as one line.
"""

from __future__ import annotations

import os
import sys

from .errors import StreamPruneError, lm_eval_context, one_line
from .hub import Offline, datasets_from_cache_when_offline, unreachable_note


def _include_path(argv: list[str]) -> str | None:
    """The value of lm-eval's --include_path in argv (either spelling, `--include_path DIR` or `=DIR`)."""
    for i, arg in enumerate(argv):
        if arg == "--include_path" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--include_path="):
            return arg.partition("=")[2]
    return None


def main() -> None:
    """Runs lm-eval's command with streamprune's error rules: a StreamPruneError (bad --model_args, a model
    streamprune cannot open) is one `Error: ...` line on stderr and its exit status (1); lm-eval's own
    errors (an unknown task, a dataset it cannot download offline) one `Error: Type: message` line and
    status 1; when the Hugging Face Hub cannot be reached, datasets come from datasets' cache at once
    (hub.datasets_from_cache_when_offline) instead of after about 24 s of retries each; Ctrl-C `Error: interrupted` and status 130 (as `streamprune eval`).  STREAMPRUNE_DEBUG=1
    shows the traceback instead.  lm-eval's own usage errors (argparse) are left as lm-eval prints them.
    After lm-eval's table, a `streamprune: ...` line on stderr gives the work StreamedLM did (work.Work)."""
    try:
        from lm_eval.__main__ import cli_evaluate

        import streamprune.evaluate.harness  # noqa: F401  (registers the "streamprune" model)
    except ImportError:
        sys.stderr.write("Error: lm-evaluation-harness is not installed; pip install 'streamprune[lmeval]'\n")
        sys.exit(1)
    from .cli import show_warnings

    show_warnings()
    debug = os.environ.get("STREAMPRUNE_DEBUG") == "1"
    include_path = _include_path(sys.argv[1:])
    if include_path is not None and not os.path.isdir(include_path):  # lm-eval would just not find the tasks
        sys.stderr.write(f"Error: --include_path {include_path} is not a folder; give the folder of your task YAMLs\n")
        sys.exit(1)
    from .evaluate.harness import StreamedLM
    from .evaluate.runner import offline_yaml_hint, skipped_yamls_note, unknown_metrics_refused, warn_skipped_yamls

    StreamedLM.works.clear()  # this command's models only (a test calls main more than once)
    if include_path is not None:  # before the evaluation, which may take hours; lm-eval says nothing of them
        warn_skipped_yamls(include_path)

    offline = Offline()
    try:
        with unknown_metrics_refused(), datasets_from_cache_when_offline() as offline:
            cli_evaluate()
        for work in StreamedLM.works:  # lm-eval prints its table; how much sharing saved is streamprune's to say
            if work.requests:
                sys.stderr.write(f"streamprune: {work.describe()}\n")
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write("\nError: interrupted\n")
        sys.exit(130)
    except StreamPruneError as exc:
        if debug:
            raise
        sys.stderr.write(f"\nError: {one_line(exc)}\n")
        sys.exit(getattr(exc, "exit_code", 1))
    except Exception as exc:  # lm-eval's: still one line, as streamprune's own commands print them
        if debug:
            raise
        said = one_line(exc).removeprefix("Error: ") + lm_eval_context(exc)
        if said.startswith("Tasks not found: "):
            said += _closest_task(str(exc), include_path)
            if include_path is not None:  # lm-eval skips broken YAMLs silently
                said += skipped_yamls_note(include_path)
        if offline.reason and isinstance(exc, ConnectionError):  # offline: say why and what to do
            said += f"; {unreachable_note(offline.reason)}; {offline_yaml_hint('--include_path')}"
        sys.stderr.write(f"\nError: {type(exc).__name__}: {said} (rerun with STREAMPRUNE_DEBUG=1 for the traceback)\n")
        sys.exit(1)


def _closest_task(message: str, include_path: str | None) -> str:
    """' (did you mean 'X'?)' for the first name of lm-eval's "Tasks not found: a, b", among the tasks,
    groups and tags of lm-eval's index (built again: lm-eval's own is not reachable from here; seconds,
    and only after that error), else ''."""
    from lm_eval.tasks import TaskManager

    from .errors import did_you_mean

    missing = message.removeprefix("Tasks not found: ").split(", ")[0].strip()
    try:
        names = TaskManager(include_path=include_path).all_tasks
    except Exception:  # the error at hand is what matters; no suggestion then
        return ""
    return did_you_mean(missing, names)


if __name__ == "__main__":
    main()
