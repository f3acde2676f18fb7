"""Against a real `mlflow server` on 127.0.0.1: track, register, promote, then serve over HTTP."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import COLOURS, blank_store, free_port, run_cli
from mltag.data.formats import read_lst

pytestmark = pytest.mark.slow


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early with code {proc.returncode}; see {proc.args[:3]} log")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def start(cmd, env, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=20)


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1 with its store under ``folder`` (restartable on the same store)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "server.db").exists():
        blank_store(folder / "server.db")
    bin_dir = Path(sys.executable).parent
    proc = start([str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                  "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                  "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
                 # no job-runner processes: they burn CPU at start and no test uses them
                 {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, folder / f"server-{time.time():.0f}.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
    except BaseException:
        stop(proc)
        raise
    return proc


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = start_server(tmp_path, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def test_steps_against_server_then_serve(tmp_path, colour_dataset, fake_backbone, mlflow_server):
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    w = tmp_path / "work"
    w.mkdir()
    steps = [
        ("prepare", "--input", str(colour_dataset), "--out", "prepared"),
        ("bottleneck", "--handle", str(fake_backbone), "--cache-dir", "cache"),
        ("train", "--learning-rate", "0.05", "--patience", "30", "--epochs", "150"),
        ("evaluate", "--bootstrap", "50"),
        ("calibrate",),
        ("register", "--model-name", "served"),
    ]
    paths = {"bottleneck": ("--prepared", "prepared", "--out", "bn"),
             "train": ("--bottlenecks", "bn", "--prepared", "prepared", "--out", "m"),
             "evaluate": ("--model", "m", "--bottlenecks", "bn", "--prepared", "prepared", "--out", "ev",
                          "--metrics", "ev.json"),
             "calibrate": ("--evaluation", "ev", "--model", "m", "--bottlenecks", "bn", "--out", "th.json",
                           "--metrics", "ca.json"),
             "register": ("--model", "m", "--thresholds", "th.json", "--prepared", "prepared", "--out", "rg.json",
                          "--reports", "ev/details.json", "reports/calibrate/details.json")}
    for step, *args in steps:
        run_cli("--quiet", step, *args, *paths.get(step, ()), cwd=w, env=env)
    reg = json.loads((w / "rg.json").read_text())
    assert reg["promoted"] and reg["tracking_uri"] == mlflow_server
    assert not (w / "mlflow.db").exists(), "steps must use the server, not the embedded default"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    mv = client.get_model_version_by_alias("served", "champion")
    assert str(mv.version) == str(reg["version"])
    run = client.get_run(mv.run_id)
    assert run.data.metrics["test_map"] >= 0.9 and "calibrated_test_micro_f1" in run.data.metrics  # logged by register

    # lineage: the version followed back to its data (an MLflow dataset input), code, params and run (#54)
    assert [d.dataset.source for d in run.inputs.dataset_inputs] == [json.dumps({"uri": str(colour_dataset)})]
    shown = run_cli("lineage", "served@champion", cwd=w, env=env).stdout
    assert f"served/{reg['version']}  (challenger, champion)" in shown and str(colour_dataset) in shown, shown
    assert "data version   untracked (manifest-" in shown and f"run            {mv.run_id}" in shown, shown
    full = json.loads(run_cli("lineage", f"served/{reg['version']}", "--json", cwd=w, env=env).stdout)
    assert full["datasets"][0]["name"] == "colours" and full["mltag_version"] and full["metrics"]["test_map"] >= 0.9
    assert full["params"]["train.learning_rate"] == "0.05"
    # `mltag promote` by hand records who and why.
    run_cli("promote", "served", str(reg["version"]), "--reason", "smoke test", "--user", "ci", cwd=w, env=env)
    tags = client.get_model_version("served", str(reg["version"])).tags
    assert tags["mltag.promoted_by"] == "ci" and tags["mltag.promoted_reason"] == "smoke test"

    port = free_port()
    # `mlflow models serve` runs uvicorn from PATH: the venv's bin must be on it.
    senv = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server,
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    serve = start([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/served@champion",
                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], senv, tmp_path / "serve.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", serve, timeout=240)
        rows = read_lst(colour_dataset / "all.lst")[:3]
        body = {"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode((colour_dataset / r.path).read_bytes()).decode()] for r in rows]}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            preds = json.loads(r.read())["predictions"]
        for r, p in zip(rows, preds):
            assert p["labels"].split(",") == [c for c, f in zip(COLOURS, r.flags) if f]
            assert 0.0 <= p["score_red"] <= 1.0
        # a bad row: HTTP 400 naming the row, and no server stack trace in the answer
        body["dataframe_split"]["data"].insert(2, [base64.b64encode(b"\xff\xd8 not a JPEG").decode()])
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(req, timeout=60)
        assert answer.value.code == 400
        err = json.loads(answer.value.read())
        assert "Error: row 2: unreadable image: not an image" in err["message"] and "stack_trace" not in err, err
        assert "Traceback" not in json.dumps(err)
        # a bad parameter: HTTP 400 naming what is allowed, no stack trace with the model's artifact paths (#51)
        body = {"dataframe_split": {"columns": ["image"], "data": body["dataframe_split"]["data"][:1]},
                "params": {"tta": "sideways"}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(req, timeout=60)
        err = json.loads(answer.value.read())
        assert answer.value.code == 400 and "'tta' must be one of none, mean, max, got 'sideways'" in err["message"]
        assert "stack_trace" not in err and "Traceback" not in json.dumps(err), err
    finally:
        stop(serve)
