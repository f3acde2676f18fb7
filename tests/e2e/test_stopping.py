"""A step stopped from outside: SIGTERM (a pod stopped) or Ctrl-C ends its run as KILLED and says so in one line;
kill -9 leaves its run RUNNING (never FINISHED) for the next train to close, and no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mltag.config import sections
from mltag.steps.bottleneck import bottleneck
from mltag.steps.prepare import prepare

pytestmark = pytest.mark.slow


def children(pid: int) -> set[int]:
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_train_left():
    """A failed assertion must not leave an hours-long train running (it would slow every later test)."""
    yield
    while _started:
        p = _started.pop()
        if p.poll() is None:
            p.kill()
            p.wait()


def start_train(tmp_path: Path, out: str, group: bool = False) -> subprocess.Popen:
    """A train that runs for hours (one row per batch, millions of epochs: a fast machine fits 20,000 in 30 s) with
    its refit beside it;
    ``group``: in a process group of its own, as a shell runs a foreground job (Ctrl-C reaches all of it)."""
    args = ["train", "--bottlenecks", str(tmp_path / "bn"), "--out", str(tmp_path / out), "--epochs", "5000000",
            "--patience", "5000000", "--batch-size", "1", "--learning-rate", "0.0001"]
    # a pytest-xdist worker ignores SIGINT, and an ignored signal stays ignored across exec: give train a
    # terminal's default, as a shell does for a foreground job
    p = subprocess.Popen([sys.executable, "-m", "mltag.cli", *args], cwd=tmp_path, stderr=subprocess.PIPE,
                         text=True, start_new_session=group,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _started.append(p)
    return p


def wait_for_running(p: subprocess.Popen, client) -> None:
    """Until train's run shows as RUNNING (MLflow imported, the run opened, the fit under way)."""
    deadline = time.time() + 60
    while time.time() < deadline and not client.search_runs(
            [e.experiment_id for e in client.search_experiments()], "attributes.status = 'RUNNING'"):
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.2)
    assert p.poll() is None and time.time() < deadline, "train's run never showed as RUNNING"


def test_sigterm_ends_the_run_as_killed_and_kill_9_leaves_it_running_with_no_process(
        tmp_path, colour_dataset, fake_backbone, mlflow_store):
    from mlflow import MlflowClient

    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone),
               cache_dir=tmp_path / "cache", views=1), progress=False)
    client = MlflowClient(mlflow_store)  # the store train logs to, whatever an earlier test left process-wide

    p = start_train(tmp_path, "model")
    wait_for_running(p, client)
    assert not children(p.pid), "a step is one plain process"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM)" in err and "Traceback" not in err, err[-2000:]
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"

    p = start_train(tmp_path, "model2")
    time.sleep(1)
    deadline = time.time() + 60
    while time.time() < deadline and len(client.search_runs(
            [e.experiment_id for e in client.search_experiments()], "attributes.status = 'RUNNING'")) < 1:
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    statuses = sorted(r.info.status for r in client.search_runs([e.experiment_id for e in client.search_experiments()]))
    assert statuses == ["KILLED", "RUNNING"], statuses  # no exit hook ran: never FINISHED


def test_ctrl_c_ends_train_with_one_line_and_its_run_killed(tmp_path, colour_dataset, fake_backbone, mlflow_store):
    """Ctrl-C reaches the step (the terminal's process group): it says one line, with no traceback, and its
    run ends KILLED, not FINISHED by MLflow's exit hook."""
    from mlflow import MlflowClient

    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone),
               cache_dir=tmp_path / "cache", views=1), progress=False)
    client = MlflowClient(mlflow_store)
    p = start_train(tmp_path, "model", group=True)
    wait_for_running(p, client)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert len([ln for ln in err.splitlines() if ln.strip()]) <= 3, err[-2000:]
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"


_FINALIZER_STOP = """
import os, signal, sys, weakref
from mltag.cli import on_sigterm
from mltag.errors import Terminated

on_sigterm()
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a pytest-xdist worker ignores it)
sig = getattr(signal, sys.argv[1])


class Cached:
    pass


obj = Cached()


def callback(ref):  # a weakref callback, as MLflow's and TensorFlow's caches run them in the middle of a fit
    os.kill(os.getpid(), sig)
    for _ in range(100000):  # the signal's handler runs here, inside the callback, where Python drops exceptions
        pass


ref = weakref.ref(obj, callback)
try:
    del obj
    for _ in range(10**8):  # seconds of work: the stop must arrive here
        pass
    print("ran on")
except (Terminated, KeyboardInterrupt) as e:
    print("stopped", type(e).__name__)
"""


@pytest.mark.parametrize("sig, exc", [("SIGTERM", "Terminated"), ("SIGINT", "KeyboardInterrupt")])
def test_a_stop_that_lands_in_a_weakref_callback_still_stops_the_step(tmp_path, sig, exc):
    """Python drops an exception raised inside a finalizer or weakref callback: a SIGTERM or Ctrl-C whose handler ran
    there was lost, and a train sent SIGTERM trained on. It is raised again just after, in the step's own code."""
    (tmp_path / "stop.py").write_text(_FINALIZER_STOP)
    p = subprocess.run([sys.executable, str(tmp_path / "stop.py"), sig], capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == f"stopped {exc}", (p.stdout, p.stderr[-2000:])
    assert "Exception ignored" not in p.stderr, p.stderr[-2000:]
