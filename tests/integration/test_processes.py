"""No child outlives its step, and no step hangs when a child dies."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest

from mltag.errors import MltagError


@pytest.mark.parametrize("after", [0.02, 0.3, 1.0])
def test_a_refit_child_that_is_killed_fails_train_within_seconds_saying_what_died(after):
    """The OOM killer or a segfault ends the forked refit, whether it is fitting or waiting for the first fit:
    train stops at its next epoch with a message, instead of waiting forever on a pipe whose send end it held
    itself, or (as once, with a shared condition) on a lock the dead child held."""
    from mltag.head.fit import HeadLoss, fit_and_refit
    from mltag.workers import cpu_threads

    if cpu_threads() < 2:
        pytest.skip("the refit runs beside the first fit only on two cores or more")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    y = (x[:, :3] > 0).astype(np.float32)
    killed = []

    def kill_the_refit():
        deadline = time.time() + 30
        while time.time() < deadline and not killed:
            for child in multiprocessing.active_children():
                time.sleep(after)  # let it run a few epochs
                os.kill(child.pid, signal.SIGKILL)
                killed.append(child.pid)
                return
            time.sleep(0.01)

    threading.Thread(target=kill_the_refit, daemon=True).start()
    t0 = time.time()
    with pytest.raises(MltagError, match=r"refit process died \(exit code -9: killed by SIGKILL, perhaps the "
                                         r"out-of-memory killer\)"):
        fit_and_refit(x[:2000], y[:2000], x[2000:2500], y[2000:2500], x[:2500], y[:2500], epochs=5000, patience=5000,
                      monitor="val_loss", learning_rate=0.001, batch_size=64, hidden_units=0, dropout=0.0, seed=0,
                      loss=HeadLoss.of({}))
    assert killed and time.time() - t0 < 20
    assert not multiprocessing.active_children()


def test_a_stopped_first_fit_ends_its_refit_at_once_and_a_stopped_fold_group_its_other_group():
    """Ctrl-C or SIGTERM in the first fit (or in calibrate's first fold group): the child working beside it is
    ended at once, not left to catch up, because it holds inherited pipe ends (the MLflow helper's input) that
    would keep the helper, and so the step, waiting."""
    from mltag.head import folds
    from mltag.head.fit import HeadLoss, fit_and_refit
    from mltag.workers import cpu_threads

    if cpu_threads() < 2:
        pytest.skip("the refit and the second fold group run beside the step only on two cores or more")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    y = (x[:, :3] > 0).astype(np.float32)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.5)
        t0 = time.time()
        with pytest.raises(KeyboardInterrupt):
            fit_and_refit(x[:2000], y[:2000], x[2000:2500], y[2000:2500], x[:2500], y[:2500], epochs=10**6,
                          patience=10**6, monitor="val_loss", learning_rate=0.001, batch_size=64, hidden_units=0,
                          dropout=0.0, seed=0, loss=HeadLoss.of({}))
        assert time.time() - t0 < 10
        assert not multiprocessing.active_children()

        hp = {"learning_rate": 0.001, "best_epoch": 10**6, "batch_size": 64, "hidden_units": 0, "dropout": 0.0,
              "seed": 0}
        folds._FOLD_DATA = (x, y, np.arange(len(x)) % 4, 4, hp)
        signal.setitimer(signal.ITIMER_REAL, 1.5)
        t0 = time.time()
        with pytest.raises(KeyboardInterrupt):
            folds._map_groups(folds.fold_groups(4))
        assert time.time() - t0 < 10
        time.sleep(0.5)
        assert not multiprocessing.active_children()
    finally:
        folds._FOLD_DATA = None
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
