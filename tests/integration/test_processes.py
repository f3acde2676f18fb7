"""The refit and the fold groups run in threads of the step's own process: a failure or a stop in one ends
the other at its next epoch, and nothing is left running."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from mltag.errors import MltagError


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    return x, (x[:, :3] > 0).astype(np.float32)


def _mltag_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("mltag-")]


def test_a_refit_that_fails_fails_train_at_the_next_epoch_naming_its_error(monkeypatch):
    """A refit that raises (here: memory) is train's error, said at the first fit's next epoch, not after it."""
    from mltag.head import fit as hf
    from mltag.workers import cpu_threads

    if cpu_threads() < 2:
        pytest.skip("the refit runs beside the first fit only on two cores or more")
    x, y = _data()
    real = hf.fit_head

    def fit_head(x_, *args, **kwargs):
        if kwargs.get("gate") is not None:  # the refit
            raise MemoryError("cannot allocate 12 GB")
        return real(x_, *args, **kwargs)

    monkeypatch.setattr(hf, "fit_head", fit_head)
    t0 = time.time()
    with pytest.raises(MltagError, match=r"train.refit failed: MemoryError: cannot allocate 12 GB"):
        hf.fit_and_refit(x[:2000], y[:2000], x[2000:2500], y[2000:2500], x[:2500], y[:2500], epochs=10**6,
                         patience=10**6, monitor="val_loss", learning_rate=0.001, batch_size=64, hidden_units=0,
                         dropout=0.0, seed=0, loss=hf.HeadLoss.of({}))
    assert time.time() - t0 < 10 and not _mltag_threads()


def test_a_stopped_first_fit_ends_its_refit_at_once_and_a_stopped_fold_group_its_other_group():
    """Ctrl-C or SIGTERM in the first fit (or in calibrate's first fold group): the thread working beside it
    ends at its next epoch, not after catching up."""
    from mltag.head import folds
    from mltag.head.fit import fit_and_refit
    from mltag.head.model import HeadLoss
    from mltag.workers import cpu_threads

    if cpu_threads() < 2:
        pytest.skip("the refit and the second fold group run beside the step only on two cores or more")
    x, y = _data()

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
        assert time.time() - t0 < 10 and not _mltag_threads()

        hp = {"learning_rate": 0.001, "best_epoch": 10**6, "batch_size": 64, "hidden_units": 0, "dropout": 0.0,
              "seed": 0}
        signal.setitimer(signal.ITIMER_REAL, 1.5)
        t0 = time.time()
        with pytest.raises(KeyboardInterrupt):
            folds._map_groups(folds.fold_groups(4), (x, y, np.arange(len(x)) % 4, 4, hp))
        assert time.time() - t0 < 10 and not _mltag_threads()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_the_threaded_refit_and_fold_groups_give_what_one_thread_gives(monkeypatch):
    """The heads do not depend on whether the refit and the second fold group ran beside the first."""
    from mltag import workers
    from mltag.head import folds
    from mltag.head.fit import fit_and_refit
    from mltag.head.model import HeadLoss

    x, y = _data()
    kw = dict(epochs=30, patience=5, monitor="val_loss", learning_rate=0.003, batch_size=64, hidden_units=16,
              dropout=0.1, seed=3, loss=HeadLoss.of({}))
    hp = {"learning_rate": 0.003, "best_epoch": 7, "batch_size": 64, "hidden_units": 16, "dropout": 0.1, "seed": 1}
    data = (x, y, np.arange(len(x)) % 4, 4, hp)
    got = []
    for cores in (2, 1):
        monkeypatch.setattr(workers, "cpu_threads", lambda c=cores: c)
        _, history, _, refit = fit_and_refit(x[:2000], y[:2000], x[2000:2500], y[2000:2500], x[:2500], y[:2500], **kw)
        heads = folds._map_groups(folds.fold_groups(4), data)
        got.append((history, refit.weights, [h.weights for g in heads for h in g]))
    (h2, r2, f2), (h1, r1, f1) = got
    assert h2 == h1
    assert all(np.array_equal(a, b) for a, b in zip(r2, r1))
    assert all(np.array_equal(a, b) for fa, fb in zip(f2, f1) for a, b in zip(fa, fb))
