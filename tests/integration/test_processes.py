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


def test_a_refit_child_that_is_killed_fails_train_within_seconds_saying_what_died():
    """The OOM killer or a segfault ends the forked refit: train stops at its next epoch with a message,
    instead of waiting forever on a pipe whose send end it held itself."""
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
                time.sleep(0.3)  # let it run a few epochs
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
