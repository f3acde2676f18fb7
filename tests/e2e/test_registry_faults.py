"""The registry's seams against a real `mlflow server` behind a proxy that answers chosen requests with errors:
a registry that fails to answer is never read as "nothing there", a create that MLflow's client retried leaves one
version, and promote records who and why before it moves the alias."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_mlflow_server import start_server, stop

from conftest import free_port, reset_mlflow_uris, run_cli

pytestmark = pytest.mark.slow

SEARCH = "/api/2.0/mlflow/model-versions/search"
ALIAS = "/api/2.0/mlflow/registered-models/alias"
SET_TAG = "/api/2.0/mlflow/model-versions/set-tag"
CREATE = "/api/2.0/mlflow/model-versions/create"


class FaultProxy:
    """An HTTP proxy in front of ``upstream``: ``rules[(method, path)]`` is ``"503"`` (answer 503, forward nothing)
    or ``"504-after"`` (forward, then answer 504 once: a create that succeeded but whose answer was lost)."""

    def __init__(self, upstream: str):
        self.upstream, self.rules, self.seen = upstream, {}, []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _any(self):
                path = self.path.split("?", 1)[0]
                proxy.seen.append((self.command, path))
                rule = proxy.rules.get((self.command, path))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if rule == "503":
                    return self._answer(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected"}')
                req = urllib.request.Request(proxy.upstream + self.path, data=body if body else None,
                                             method=self.command,
                                             headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                try:
                    with urllib.request.urlopen(req, timeout=120) as r:
                        status, data = r.status, r.read()
                except urllib.error.HTTPError as e:
                    status, data = e.code, e.read()
                if rule == "504-after":
                    proxy.rules.pop((self.command, path))
                    return self._answer(504, b"gateway timeout (injected)")
                self._answer(status, data)

            def _answer(self, status: int, data: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def proxied(tmp_path):
    port = free_port()
    server = start_server(tmp_path / "server", port)
    proxy = FaultProxy(f"http://127.0.0.1:{port}")
    try:
        yield proxy, f"http://127.0.0.1:{port}"
    finally:
        proxy.close()
        stop(server)


def _train(w: Path, colour_dataset, fake_backbone, tracking_uri: str, out: str, lr: str) -> None:
    """prepare and bottleneck (once), then train (its run on the server behind the proxy), evaluate and calibrate,
    in this process: the seams under test are register's and promote's, which run as processes."""
    from mltag.config import sections
    from mltag.steps.bottleneck import bottleneck
    from mltag.steps.calibrate import calibrate
    from mltag.steps.evaluate import evaluate
    from mltag.steps.prepare import prepare
    from mltag.steps.train import train

    if not (w / "prepared").exists():
        prepare(w / "prepared", **sections("prepare", input=colour_dataset), progress=False)
        bottleneck(w / "prepared", w / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=w / "cache",
                                                        views=1), progress=False)
    train(w / "bn", w / out, **sections("train", learning_rate=float(lr), epochs=150, patience=30),
          tracking_uri=tracking_uri, progress=False)
    evaluate(w / out, w / "bn", w / f"{out}-ev", w / f"{out}-ev.json", **sections("evaluate", bootstrap=50))
    calibrate(w / f"{out}-ev", w / out, w / f"{out}-th.json", w / f"{out}-ca.json", **sections("calibrate"),
              bottlenecks=w / "bn", progress=False, oof_out=w / f"{out}-oof.npz", report=w / f"{out}-ca-r.json")


def _register(w: Path, env, out: str, check: bool = True):
    return run_cli("register", "--model", out, "--thresholds", f"{out}-th.json", "--prepared", "prepared",
                   "--bottlenecks", "bn", "--out", f"{out}-rg.json", "--model-name", "faults", "--tflite", "false",
                   cwd=w, env=env, check=check)


def test_a_registry_that_fails_to_answer_never_promotes_and_a_retried_create_leaves_one_version(
        tmp_path, colour_dataset, fake_backbone, proxied):
    from mlflow import MlflowClient

    proxy, direct = proxied
    reset_mlflow_uris()  # a registry URI an earlier test exported would send register's writes elsewhere
    env = {"MLFLOW_TRACKING_URI": proxy.url, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
    w = tmp_path / "work"
    w.mkdir()
    client = MlflowClient(tracking_uri=direct, registry_uri=direct)
    _train(w, colour_dataset, fake_backbone, proxy.url, "m1", "0.05")
    _register(w, env, "m1")
    assert str(client.get_model_version_by_alias("faults", "champion").version) == "1"

    # 1. The champion lookup answers 503: an error naming the server, no version, no alias moved.
    _train(w, colour_dataset, fake_backbone, proxy.url, "m2", "0.0005")  # a weaker model
    proxy.rules[("GET", ALIAS)] = "503"
    p = _register(w, env, "m2", check=False)
    assert p.returncode == 2 and "failed to answer" in p.stderr and proxy.url.split("//")[1] in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and "no champion yet" not in p.stdout + p.stderr
    assert [str(v.version) for v in client.search_model_versions("name='faults'")] == ["1"]
    assert str(client.get_model_version_by_alias("faults", "champion").version) == "1"
    proxy.rules.clear()

    # 2. The version search answers 503: the same, never a duplicate of the content.
    proxy.rules[("GET", SEARCH)] = "503"
    p = _register(w, env, "m1", check=False)
    assert p.returncode == 2 and "failed to answer" in p.stderr, p.stderr
    assert [str(v.version) for v in client.search_model_versions("name='faults'")] == ["1"]
    proxy.rules.clear()

    # 3. A create that succeeded but whose answer was lost (504): MLflow's client retries it, which makes a second
    # version of one content; register keeps the oldest and deletes its own newer one.
    proxy.rules[("POST", CREATE)] = "504-after"
    p = _register(w, env, "m2")
    contents = {}
    for v in client.search_model_versions("name='faults'"):
        contents.setdefault(v.tags.get("mltag.content_hash"), []).append(str(v.version))
    assert sorted(len(vs) for vs in contents.values()) == [1, 1], contents  # m1's and m2's: one each
    reg = json.loads((w / "m2-rg.json").read_text())
    assert [str(reg["version"])] == contents[reg["content_hash"]], (reg, contents)
    assert proxy.seen.count(("POST", CREATE)) >= 2, "the client did not retry the create: the test proves nothing"

    # 4. promote with the tag write failing: one line, and champion has not moved.
    before = str(client.get_model_version_by_alias("faults", "champion").version)
    other = next(str(v.version) for v in client.search_model_versions("name='faults'") if str(v.version) != before)
    proxy.rules[("POST", SET_TAG)] = "503"
    p = run_cli("promote", "faults", other, "--reason", "test", cwd=w, env=env, check=False)
    assert p.returncode == 2 and "failed to answer" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert str(client.get_model_version_by_alias("faults", "champion").version) == before
    proxy.rules.clear()
    run_cli("promote", "faults", other, "--reason", "test", cwd=w, env=env)
    assert str(client.get_model_version_by_alias("faults", "champion").version) == other
