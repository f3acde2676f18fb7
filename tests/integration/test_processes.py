"""Train's refit and calibrate's fold heads run in the step's own thread, one after the other: no child process,
no thread, and the heads are the ones a fit of that many epochs gives alone."""

from __future__ import annotations

import threading

import numpy as np


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    return x, (x[:, :3] > 0).astype(np.float32)


def test_the_refit_is_a_fit_of_the_chosen_epochs_on_train_and_val_and_starts_nothing():
    import multiprocessing

    from mltag.head.fit import best_epoch, fit_and_refit, fit_head
    from mltag.head.model import HeadLoss

    x, y = _data()
    kw = dict(learning_rate=0.003, batch_size=64, hidden_units=16, dropout=0.1, seed=3, loss=HeadLoss.of({}))
    before = set(threading.enumerate())
    _, history, mon, refit = fit_and_refit(x[:2000], y[:2000], x[2000:2500], y[2000:2500], x[:2500], y[:2500],
                                           epochs=30, patience=5, monitor="val_loss", **kw)
    assert set(threading.enumerate()) == before and not multiprocessing.active_children()
    alone, _, _ = fit_head(x[:2500], y[:2500], None, None, epochs=best_epoch(history, mon), patience=0,
                           monitor="val_loss", **kw)
    assert all(np.array_equal(a, b) for a, b in zip(refit.weights, alone.weights))


def test_a_first_fit_that_diverges_at_once_has_no_refit():
    from mltag.head.fit import fit_and_refit
    from mltag.head.model import HeadLoss

    x, y = _data()
    with np.errstate(all="ignore"):
        _, history, _, refit = fit_and_refit(x[:2000] * 1e30, y[:2000], x[2000:2500], y[2000:2500], x[:2500], y[:2500],
                                             epochs=5, patience=5, monitor="val_loss", learning_rate=10.0,
                                             batch_size=64, hidden_units=0, dropout=0.0, seed=0, loss=HeadLoss.of({}))
    assert refit is None and not np.isfinite(history["loss"]).all()
