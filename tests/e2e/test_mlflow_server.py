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


def test_steps_against_a_server_with_credentials_then_serve_and_the_secret_goes_nowhere(tmp_path, colour_dataset,
                                                                                       fake_backbone):
    """The steps as processes against a real `mlflow server` reached as http://user:password@...: track; the server
    stopped before register, a clear error in seconds naming the server (not the credentials) and the model folder
    kept; restarted, register alone registers and promotes; lineage, promote by hand, a model from another store;
    then `mlflow models serve` from the registry. The user name and the password appear in no output, no file, no
    MLflow tag, param or log, and not in the server's own store."""
    from mlflow import MlflowClient

    user, secret = "alice-9f3k", "S3cretPw-x7Qz"
    port = free_port()
    mlflow_server = f"http://127.0.0.1:{port}"  # what every message and record names: the URI without credentials
    env = {"MLFLOW_TRACKING_URI": f"http://{user}:{secret}@127.0.0.1:{port}"}
    w = tmp_path / "work"
    w.mkdir()
    outputs: list[str] = []

    def cli(*args, check=True, env=env):
        p = run_cli(*args, cwd=w, env=env, check=check)
        outputs.extend([p.stdout, p.stderr])
        return p

    steps = [
        ("prepare", "--input", str(colour_dataset), "--out", "prepared"),
        ("bottleneck", "--handle", str(fake_backbone), "--cache-dir", "cache"),
        ("train", "--learning-rate", "0.05", "--patience", "30", "--epochs", "150"),
        ("evaluate", "--bootstrap", "50"),
        ("calibrate",),
    ]
    paths = {"bottleneck": ("--prepared", "prepared", "--out", "bn"),
             "train": ("--bottlenecks", "bn", "--prepared", "prepared", "--out", "m"),
             "evaluate": ("--model", "m", "--bottlenecks", "bn", "--prepared", "prepared", "--out", "ev",
                          "--metrics", "ev.json"),
             "calibrate": ("--evaluation", "ev", "--model", "m", "--bottlenecks", "bn", "--out", "th.json",
                           "--metrics", "ca.json")}
    register = ("register", "--model", "m", "--thresholds", "th.json", "--prepared", "prepared", "--out", "rg.json",
                "--reports", "ev/details.json", "reports/calibrate/details.json", "--model-name", "served")
    server = start_server(tmp_path / "srv", port)
    serve = None
    try:
        for step, *args in steps:  # train with -v: MLflow's own debug lines pass through the same mask
            cli("-v" if step == "train" else "--quiet", step, *args, *paths.get(step, ()))
        stop(server)
        t0 = time.time()
        p = cli("--quiet", *register, check=False)
        assert p.returncode == 2 and mlflow_server in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert time.time() - t0 < 15 and (w / "m" / "model.json").is_file()  # the model folder kept for the rerun
        p = cli("-v", *register, check=False)  # the traceback and MLflow's exception texts masked too
        assert p.returncode == 2 and "Traceback" in p.stderr, p.stderr[-2000:]
        server = start_server(tmp_path / "srv", port)
        cli("--quiet", *register)
        reg = json.loads((w / "rg.json").read_text())
        assert reg["promoted"] and reg["tracking_uri"] == mlflow_server
        assert not (w / "mlflow.db").exists(), "steps must use the server, not the embedded default"

        client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)  # (the server asks for none)
        mv = client.get_model_version_by_alias("served", "champion")
        assert str(mv.version) == str(reg["version"])
        run = client.get_run(mv.run_id)
        assert run.data.metrics["test_map"] >= 0.9 and "calibrated_test_micro_f1" in run.data.metrics  # by register

        # lineage: the version followed back to its data (an MLflow dataset input), code, params and run (#54)
        assert [d.dataset.source for d in run.inputs.dataset_inputs] == [json.dumps({"uri": str(colour_dataset)})]
        shown = cli("lineage", "served@champion").stdout
        assert f"served/{reg['version']}  (challenger, champion)" in shown and str(colour_dataset) in shown, shown
        assert "data version   untracked (manifest-" in shown and f"run            {mv.run_id}" in shown, shown
        full = json.loads(cli("lineage", f"served/{reg['version']}", "--json").stdout)
        assert full["datasets"][0]["name"] == "colours" and full["mltag_version"] and full["metrics"]["test_map"] >= 0.9
        assert full["params"]["train.learning_rate"] == "0.05"
        # `mltag promote` by hand records who and why.
        cli("promote", "served", str(reg["version"]), "--reason", "smoke test", "--user", "ci")
        tags = client.get_model_version("served", str(reg["version"])).tags
        assert tags["mltag.promoted_by"] == "ci" and tags["mltag.promoted_reason"] == "smoke test"
        # A model trained against another store: the stand-in run's tag and warning line hold the masked URI.
        local = f"sqlite:///{tmp_path / 'other.db'}"
        p = cli("register", "--model", "m", "--thresholds", "th.json", "--prepared", "prepared", "--out",
                "other-rg.json", "--model-name", "elsewhere", "--tflite", "false", env={"MLFLOW_TRACKING_URI": local})
        assert f"trained against {mlflow_server}" in p.stderr, p.stderr
        client_local = MlflowClient(local)
        stand_in = client_local.search_runs([e.experiment_id for e in client_local.search_experiments()])
        assert stand_in and stand_in[0].data.tags["mltag.trained_in"] == mlflow_server
        stored = [str(r.data.tags) for r in stand_in]
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert runs
        stored += [str(r.data.tags) + str(r.data.params) for r in runs]
        stored += [str(v.tags) for v in client.search_model_versions("name='served'")]
        stored += [a.path for r in runs for a in client.list_artifacts(r.info.run_id)]

        serve_port = free_port()
        # `mlflow models serve` runs uvicorn from PATH: the venv's bin must be on it.
        senv = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server,
                    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        serve = start([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/served@champion",
                       "--env-manager", "local", "-h", "127.0.0.1", "-p", str(serve_port)], senv, tmp_path / "serve.log")
        wait_http(f"http://127.0.0.1:{serve_port}/ping", serve, timeout=240)
        rows = read_lst(colour_dataset / "all.lst")[:3]
        body = {"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode((colour_dataset / r.path).read_bytes()).decode()] for r in rows]}}
        req = urllib.request.Request(f"http://127.0.0.1:{serve_port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            preds = json.loads(r.read())["predictions"]
        for r, p in zip(rows, preds):
            assert p["labels"].split(",") == [c for c, f in zip(COLOURS, r.flags) if f]
            assert 0.0 <= p["score_red"] <= 1.0
        # a bad row: HTTP 400 naming the row, and no server stack trace in the answer
        body["dataframe_split"]["data"].insert(2, [base64.b64encode(b"\xff\xd8 not a JPEG").decode()])
        req = urllib.request.Request(f"http://127.0.0.1:{serve_port}/invocations", data=json.dumps(body).encode(),
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
        req = urllib.request.Request(f"http://127.0.0.1:{serve_port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(req, timeout=60)
        err = json.loads(answer.value.read())
        assert answer.value.code == 400 and "'tta' must be one of none, mean, max, got 'sideways'" in err["message"]
        assert "stack_trace" not in err and "Traceback" not in json.dumps(err), err
    finally:
        if serve is not None:
            stop(serve)
        stop(server)
    for text in outputs + stored:
        assert secret not in text and user not in text, text[-3000:]
    for f in tmp_path.rglob("*"):  # every file: run.json, register.json, the server's database and logs, serve's log
        if f.is_file():
            data = f.read_bytes()
            assert secret.encode() not in data and user.encode() not in data, f
