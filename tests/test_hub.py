"""Datasets from the Hugging Face Hub when it cannot be reached: the cached copy at once, else a prompt error.

The Hub is made unreachable for real: HF_ENDPOINT names a closed local port, in a child process (the
libraries read it when imported), so these tests behave the same with or without a network."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from streamprune import hub

CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens there, the connection is refused

CHILD = r"""
import json, logging, shutil, sys
from pathlib import Path
from click.testing import CliRunner
import datasets, huggingface_hub.constants
from streamprune.cli import main

model, tmp = sys.argv[1], Path(sys.argv[2])
said = []  # datasets' own log lines: whether it read its cache in offline mode
handler = logging.Handler()
handler.emit = lambda record: said.append(record.getMessage())
logging.getLogger("datasets").addHandler(handler)
out = {}

def run(*args):
    result = CliRunner().invoke(main, [*args, "--quiet"])
    return {"code": result.exit_code, "stderr": result.stderr.strip().splitlines()[-1:]}

out["boolq_uncached"] = run("eval", model, "--tasks", "boolq", "--limit", "2", "--device", "cpu")
out["calibration"] = run("prune", model, str(tmp / "pruned"), "--calib", "c4", "--nsamples", "2", "--seqlen", "16")
out["pruned_written"] = (tmp / "pruned" / "manifest.json").exists()

# a copy of BoolQ in datasets' cache, as a first online load leaves it (aps/super_glue, config boolq)
rows = tmp / "rows.jsonl"
rows.write_text("".join(json.dumps({"question": q, "passage": "Water is wet.", "idx": i, "label": i % 2}) + "\n"
                        for i, q in enumerate(["is water wet", "is water dry", "is it wet"])))
builder = datasets.load_dataset_builder("json", data_files={"validation": str(rows)}, cache_dir=str(tmp / "build"))
builder.download_and_prepare()
cached = Path(datasets.config.HF_DATASETS_CACHE) / "aps___super_glue" / "boolq" / "0.0.0" / Path(builder.cache_dir).name
shutil.copytree(builder.cache_dir, cached)
for arrow in cached.glob("json-*.arrow"):
    arrow.rename(cached / arrow.name.replace("json-", "super_glue-"))
info = json.loads((cached / "dataset_info.json").read_text())
(cached / "dataset_info.json").write_text(json.dumps({**info, "config_name": "boolq", "dataset_name": "super_glue"}))
said.clear()
out["boolq_cached"] = run("eval", model, "--tasks", "boolq", "--limit", "2", "--device", "cpu", "--json", str(tmp / "r.json"))
out["cached_read_offline"] = any("offline mode is enabled" in line for line in said)
out["results"] = json.loads((tmp / "r.json").read_text())["tasks"]["boolq"] if (tmp / "r.json").exists() else None
out["offline_after"] = [huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE]
print(json.dumps(out))
"""


def test_an_unreachable_hub_means_the_cached_copy_at_once_or_an_error_that_says_so(tiny_checkpoint, tmp_path):
    """With the Hub unreachable (and HF_HUB_OFFLINE unset): a built-in task or calibration corpus with no
    cached copy fails at once, its error naming the reason and the offline option; a cached copy is read
    in datasets' offline mode (no retries), and evaluated; the libraries' flags are restored afterwards."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=CLOSED_PORT, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"))
    done = subprocess.run([sys.executable, "-c", CHILD, str(tiny_checkpoint("llama", layers=2)), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    reason = f"the Hugging Face Hub is unreachable ({CLOSED_PORT}: "
    uncached = out["boolq_uncached"]
    assert uncached["code"] == 1 and uncached["stderr"][0].startswith(f"Error: could not load boolq: {reason}")
    assert uncached["stderr"][0].endswith(") and datasets' cache has no copy; offline, pass --data-dir DIR holding its copy as DIR/boolq/val.jsonl")
    calibration = out["calibration"]
    assert calibration["code"] == 1 and not out["pruned_written"]
    assert calibration["stderr"][0].startswith(f"Error: could not load calibration corpus 'c4': {reason}")
    assert out["boolq_cached"]["code"] == 0, out["boolq_cached"]
    assert out["cached_read_offline"]  # datasets went to its cache without asking the Hub
    assert out["results"]["n"] == 2
    assert out["offline_after"] == [False, False]


def test_the_probe_asks_once_and_counts_a_server_error_as_unreachable(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    asked = []

    class Session:
        def __init__(self, status):
            self.status = status

        def head(self, url, timeout):
            asked.append((url, timeout))
            if self.status is None:
                raise OSError("[Errno 111] Connection refused")
            return types.SimpleNamespace(status_code=self.status)

    monkeypatch.setattr(hub, "_UNREACHABLE", {})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for endpoint, status, expected in [("http://a", 200, None), ("http://b", 404, None),
                                       ("http://c", 503, "http://c answered with HTTP status 503"),
                                       ("http://d", None, "http://d: [Errno 111] Connection refused")]:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(huggingface_hub, "get_session", lambda status=status: Session(status))
        assert hub.unreachable_reason() == expected
        assert hub.unreachable_reason() == expected  # the second time from what the first found
        assert asked[-1] == (endpoint, hub.PROBE_TIMEOUT_S) and len(asked) == len({url for url, _ in asked})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the user's HF_HUB_OFFLINE=1: nothing is asked
    monkeypatch.setattr(constants, "ENDPOINT", "http://e")
    assert hub.unreachable_reason() is None and len(asked) == 4


def test_lm_eval_tasks_are_built_in_offline_mode_when_the_hub_is_unreachable(tiny_checkpoint, monkeypatch, tmp_path):
    """`eval` builds lm-eval's tasks (where their datasets load) in the libraries' offline mode when the
    Hub cannot be reached, and its error then says why; the flags are restored."""
    import datasets.config
    import lm_eval
    from click.testing import CliRunner
    from huggingface_hub import constants

    from streamprune.cli import main

    seen = []

    def building(**_):  # what datasets raises offline for a Hub dataset with no cached copy
        seen.append((constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE))
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(hub, "unreachable_reason", lambda: "https://huggingface.co: [Errno -2] Name or service not known")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(lm_eval, "simple_evaluate", building)
    result = CliRunner().invoke(main, ["eval", str(tiny_checkpoint("llama", layers=2)), "--tasks", "sp_boolq", "--include-path",
                                       "tests/data/lmeval", "--quiet", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 1 and not (tmp_path / "r.json").exists()
    assert seen == [(True, True)] and (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == (False, False)
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: lm-eval could not load a task's dataset (Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled); "
        "the Hugging Face Hub is unreachable (https://huggingface.co: [Errno -2] Name or service not known) and datasets' cache "
        "has no copy); offline, write a task YAML over local files (dataset_path: json, with data_files) and pass its folder "
        "with --include-path")
