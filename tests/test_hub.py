"""Datasets from the Hugging Face Hub when it cannot be reached: the cached copy at once, else a prompt error.

The Hub is made unreachable for real: HF_ENDPOINT names a closed local port, in a child process (the
libraries read it when imported) without proxies, so these tests behave the same with or without a
network."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

from streamprune import hub

CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens there, the connection is refused

CHILD = r"""
import json, shutil, sys, threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
import datasets, httpx2, huggingface_hub.constants
from click.testing import CliRunner
from streamprune.cli import main
from streamprune.hub import datasets_from_cache_when_offline

model, tmp = sys.argv[1], Path(sys.argv[2])
requests = []  # every HTTP request huggingface_hub makes (its httpx2 client)
send = httpx2.HTTPTransport.handle_request
httpx2.HTTPTransport.handle_request = lambda self, request: requests.append(str(request.url)) or send(self, request)
out = {}

def run(*args):
    result = CliRunner().invoke(main, [*args, "--quiet"])
    return {"code": result.exit_code, "stderr": result.stderr.strip().splitlines()[-1:]}

out["boolq_uncached"] = run("eval", model, "--tasks", "boolq", "--limit", "2", "--device", "cpu")
out["calibration"] = run("prune", model, str(tmp / "pruned"), "--calib", "c4", "--nsamples", "2", "--seqlen", "16")
out["pruned_written"] = (tmp / "pruned" / "manifest.json").exists()

# a copy of BoolQ in datasets' cache, as a first online load leaves it (aps/super_glue, config boolq)
rows = tmp / "served" / "rows.jsonl"
rows.parent.mkdir()
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
out["boolq_cached"] = run("eval", model, "--tasks", "boolq", "--limit", "2", "--device", "cpu", "--json", str(tmp / "r.json"))
out["results"] = json.loads((tmp / "r.json").read_text())["tasks"]["boolq"] if (tmp / "r.json").exists() else None

# another host's data file, once the Hub was found unreachable in the same block: still downloaded
server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(rows.parent)))
threading.Thread(target=server.serve_forever, daemon=True).start()
with datasets_from_cache_when_offline() as offline:
    datasets.load_dataset("aps/super_glue", "boolq", split="validation")
    served = datasets.load_dataset("json", data_files={"validation": f"http://127.0.0.1:{server.server_port}/rows.jsonl"}, split="validation")
    out["served"] = [offline.reason is not None, huggingface_hub.constants.HF_HUB_OFFLINE, len(served)]
server.shutdown()
out["requests"] = [url for url in requests if httpx2.URL(url).port == 9]
out["offline_after"] = [huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE]
print(json.dumps(out))
"""


def test_an_unreachable_hub_means_the_cached_copy_at_once_or_an_error_that_says_so(tiny_checkpoint, tmp_path):
    """With the Hub unreachable (and HF_HUB_OFFLINE unset): a built-in task or calibration corpus with no
    cached copy fails at once, its error naming the reason and the offline option; a cached copy is read
    at once and evaluated; one request in all goes to the Hub (the probe: no retries); another host's
    data file still downloads; the offline flag is restored afterwards."""
    proxies = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE") and k.lower() not in proxies}
    env.update(HF_ENDPOINT=CLOSED_PORT, HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"),
               NO_PROXY="127.0.0.1,localhost")
    done = subprocess.run([sys.executable, "-c", CHILD, str(tiny_checkpoint("llama", layers=2)), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    reason = f"from the Hugging Face Hub (unreachable: {CLOSED_PORT}: "
    uncached = out["boolq_uncached"]
    assert uncached["code"] == 1 and uncached["stderr"][0].startswith(f"Error: could not load boolq {reason}")
    assert uncached["stderr"][0].endswith("; datasets' cache has no copy); offline, pass --data-dir DIR holding its copy as DIR/boolq/val.jsonl")
    calibration = out["calibration"]
    assert calibration["code"] == 1 and not out["pruned_written"]
    assert calibration["stderr"][0].startswith(f"Error: could not load calibration corpus 'c4' {reason}")
    assert out["boolq_cached"]["code"] == 0, out["boolq_cached"]
    assert out["results"]["n"] == 2
    assert out["served"] == [True, True, 3]
    assert out["requests"] == [CLOSED_PORT]  # the probe, once: its answer stands for the later loads
    assert out["offline_after"] == [False, False]


def test_the_hub_is_asked_only_when_a_hub_dataset_is_loaded(monkeypatch, tmp_path):
    """Inside datasets_from_cache_when_offline, a packaged builder (json, over local or remote files) and a
    local folder load without asking; the first Hub dataset asks, and an unreachable answer puts
    huggingface_hub in offline mode for the rest of the block (nested blocks included); afterwards
    load_dataset and the flag are as before."""
    import datasets
    from huggingface_hub import constants

    loaded, asked = [], []

    def original(path, *args, **kwargs):
        loaded.append((path, constants.HF_HUB_OFFLINE))

    monkeypatch.setattr(datasets, "load_dataset", original)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "unreachable_reason", lambda: asked.append(1) or "http://hub: refused")
    with hub.datasets_from_cache_when_offline() as offline:
        datasets.load_dataset("json", data_files={"validation": "http://elsewhere/a.jsonl"})
        datasets.load_dataset(str(tmp_path))
        assert not asked and offline.reason is None
        with hub.datasets_from_cache_when_offline() as inner:
            datasets.load_dataset("allenai/ai2_arc", "ARC-Easy")
            assert inner is offline
        datasets.load_dataset("aps/super_glue", "boolq")
        assert offline.reason == "http://hub: refused" and len(asked) == 1
    assert loaded == [("json", False), (str(tmp_path), False), ("allenai/ai2_arc", True), ("aps/super_glue", True)]
    assert datasets.load_dataset is original and constants.HF_HUB_OFFLINE is False
    assert hub.failure(ConnectionError("Couldn't reach"), offline) == "unreachable: http://hub: refused; datasets' cache has no copy"
    assert hub.failure(KeyError("passage"), offline) == "KeyError: 'passage'"  # not blamed on the cache
    assert hub.failure(ConnectionError("Couldn't reach 'x'"), hub.Offline()) == "ConnectionError: Couldn't reach 'x'"


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

    monkeypatch.setattr(hub, "_PROBED", {})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for endpoint, status, expected in [("http://a", 200, None), ("http://b", 404, None),
                                       ("http://c", 503, "http://c answered with HTTP status 503"),
                                       ("http://d", None, "http://d: [Errno 111] Connection refused")]:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(huggingface_hub, "get_session", lambda status=status: Session(status))
        assert hub.unreachable_reason() == expected
        assert hub.unreachable_reason() == expected  # the second time from what the first found
        assert asked[-1] == (endpoint, hub.PROBE_TIMEOUT_S) and len(asked) == len({url for url, _ in asked})
    monkeypatch.setattr(hub, "PROBE_KEPT_S", -1.0)  # an answer older than that is asked again
    assert hub.unreachable_reason() == "http://d: [Errno 111] Connection refused" and len(asked) == 5
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the user's HF_HUB_OFFLINE=1: nothing is asked
    assert hub.unreachable_reason() is None and len(asked) == 5


def test_lm_eval_tasks_load_their_hub_datasets_offline_when_the_hub_is_unreachable(tiny_checkpoint, monkeypatch, tmp_path):
    """`eval` builds lm-eval's tasks (where their datasets load) with the check installed: a Hub dataset
    loads in offline mode when the Hub cannot be reached, and the error then says why."""
    import datasets
    import lm_eval
    from click.testing import CliRunner
    from huggingface_hub import constants

    from streamprune.cli import main

    seen = []

    def load_dataset(path, *args, **kwargs):  # what datasets raises offline for a Hub dataset with no cached copy
        seen.append((path, constants.HF_HUB_OFFLINE))
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(hub, "unreachable_reason", lambda: "https://huggingface.co: [Errno -2] Name or service not known")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **_: datasets.load_dataset("allenai/ai2_arc", "ARC-Easy"))
    result = CliRunner().invoke(main, ["eval", str(tiny_checkpoint("llama", layers=2)), "--tasks", "sp_boolq", "--include-path",
                                       "tests/data/lmeval", "--quiet", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 1 and not (tmp_path / "r.json").exists()
    assert seen == [("allenai/ai2_arc", True)] and constants.HF_HUB_OFFLINE is False and datasets.load_dataset is load_dataset
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: lm-eval could not load a task's dataset (Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled); "
        "the Hugging Face Hub is unreachable (https://huggingface.co: [Errno -2] Name or service not known) and datasets' cache "
        "has no copy); offline, write a task YAML over local files (dataset_path: json, with data_files) and pass its folder "
        "with --include-path")
