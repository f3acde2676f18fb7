"""An MLflow call is never cut in the middle by Ctrl-C or SIGTERM: the signal acts right after it (a second one at
once), so a step's own FAILED/KILLED end of its run never waits on a lock the cut call held. And stderr never shows
the tracking URI's credentials, whoever writes there."""

from __future__ import annotations

import os
import signal
import time

import pytest

from mltag.files import signals_deferred


@pytest.fixture
def ctrl_c():
    """Python's own Ctrl-C handler (a pytest-xdist worker ignores SIGINT)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_a_signal_during_the_block_acts_right_after_it(ctrl_c):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("the block ran to its end")
    assert done == ["the block ran to its end"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_signal_stays_ignored():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_a_second_signal_acts_at_once_and_sigterm_keeps_its_own_handler():
    class Terminated(BaseException):
        pass

    def terminate(signum, frame):
        raise Terminated

    old = signal.signal(signal.SIGTERM, terminate)
    try:
        reached = []
        with pytest.raises(Terminated):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                reached.append("after the second")
        assert not reached and signal.getsignal(signal.SIGTERM) is terminate
        with signals_deferred():  # nothing pending: nothing happens after
            pass
    finally:
        signal.signal(signal.SIGTERM, old)


def test_stderr_never_shows_the_tracking_uris_credentials_not_even_in_a_librarys_traceback(capsys, monkeypatch):
    """-v prints tracebacks, and MLflow puts the whole URI in its exception texts (`API request to
    http://alice:pw@host/... failed`): while a command runs, stderr masks the user name and password, in mltag's
    lines and in anything else written there; a bug keeps its traceback (masked) and exit status 1."""
    import sys
    import traceback

    from mltag.cli import _stderr_without_credentials

    uri = "http://alice-9f3k:S3cretPw-x7Qz@127.0.0.1:9"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with _stderr_without_credentials(None):
        print(f"API request to {uri}/api/2.0/mlflow/runs/get failed", file=sys.stderr)
        try:
            raise ConnectionError(f"cannot reach {uri}")
        except ConnectionError:
            traceback.print_exc()
    with pytest.raises(SystemExit) as bug:
        with _stderr_without_credentials(None):
            raise ValueError(f"a bug that names {uri}")
    err = capsys.readouterr().err
    assert bug.value.code == 1 and "ValueError: a bug that names" in err
    assert "S3cretPw-x7Qz" not in err and "alice-9f3k" not in err and "http://127.0.0.1:9" in err, err
    with _stderr_without_credentials("sqlite:///mlflow.db"):  # nothing to mask: stderr as it is
        assert sys.stderr is sys.__stderr__ or not hasattr(sys.stderr, "_uri")


def test_ctrl_c_between_the_two_renames_of_a_folder_swap_waits_for_the_second(tmp_path, ctrl_c, monkeypatch):
    """#51: an output folder is replaced by two renames (the old one aside, the new one in); Ctrl-C or SIGTERM
    between them left only the old copy aside while the message said nothing was lost. The signal now acts after
    the second rename: the new output is in place, and the old copy is gone."""
    import mltag.files as files

    out = tmp_path / "reports"
    with files.atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "scores.npz").write_text("old")
    real = os.replace
    calls = []

    def interrupted_replace(a, b):
        real(a, b)
        calls.append(b)
        if len(calls) == 1:  # the old output is aside: Ctrl-C now
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)

    monkeypatch.setattr(files.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "scores.npz").write_text("new")
    monkeypatch.undo()
    assert len(calls) == 2 and (out / "scores.npz").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["reports"]  # no copy aside, no scratch folder
