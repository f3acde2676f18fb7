"""Fitting the head (``mltag.head.model``): mini-batch Adam with Keras' defaults, dropout, early stopping;
train's refit on train+val beside the first fit; calibrate's fold heads side by side.

One model, one implementation: its weights are what ``head.npz`` and the end-to-end ``model.tflite``
hold (``mltag.head.saved``). Steps that only score cached vectors (evaluate, calibrate's refits,
suggest) run it in numpy and never import TensorFlow.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from mltag.errors import MltagError
from mltag.head.model import FlatAdam, FoldHeads, HeadLoss, NumpyHead, Rows, bce, fit_rows

log = logging.getLogger("mltag.steps.train")


def one_blas_thread(fit):
    """Run ``fit`` with numpy's BLAS on one thread. The head's matrices are small: a second thread
    only spins between the products (measured: twice the CPU for the same wall time), and the
    core it holds is better left to whatever runs beside the fit."""

    @functools.wraps(fit)
    def wrapper(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):
            return fit(*args, **kwargs)

    return wrapper


def validation_metrics(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Binary cross-entropy and mAP of validation logits ``z`` (what early stopping watches)."""
    from mltag import metrics as M

    ap = M.average_precisions(np.asarray(y), 1.0 / (1.0 + np.exp(-z)))
    return bce(z, np.asarray(y, np.float32)), float(np.nanmean(ap)) if np.isfinite(ap).any() else 0.0


@one_blas_thread
def fit_head(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray | None, y_va: np.ndarray | None, *,
             learning_rate: float, epochs: int, batch_size: int, hidden_units: int, dropout: float,
             patience: int, monitor: str, seed: int, loss: HeadLoss, progress: bool = False):
    """Fit a fresh head; with validation data and ``patience`` > 0, stop early and keep the best epoch.

    The settings are train's (``train.*``) or, for calibrate's refits, the ones model.json recorded.

    Returns:
        ``(NumpyHead, history dict, monitored key)``; history holds ``loss`` and, with
        validation data, ``val_loss`` and ``val_map`` per epoch.
    """
    rng = np.random.default_rng(seed)
    x_tr = fit_rows(x_tr)
    y_tr = np.asarray(y_tr, np.float32)
    head = NumpyHead(x_tr.shape[1], y_tr.shape[1], hidden_units, rng)
    has_val = x_va is not None and len(x_va) > 0
    if has_val:
        x_va = np.asarray(x_va, np.float32)  # once, not every epoch
    mon = monitor if has_val else monitor.removeprefix("val_")
    if mon == "map":
        mon = "loss"  # no train mAP is tracked: without validation data, watch the train loss
    adam = FlatAdam(head.weights, learning_rate)
    head.weights, grad_views = adam.weights, adam.grads
    history: dict[str, list[float]] = {"loss": []}
    if has_val:
        history.update(val_loss=[], val_map=[])
    stopper, best_weights = EarlyStopping(mon, patience), None
    for epoch in range(epochs):
        order = rng.permutation(len(x_tr))
        losses = []
        chunk = batch_size * 64  # rows gathered (and cast to float32) 64 batches at a time, not batch by batch
        for i in range(0, len(order), batch_size):
            if i % chunk == 0:
                x_chunk, y_chunk = x_tr[order[i: i + chunk]], y_tr[order[i: i + chunk]]
            xb, yb = x_chunk[i % chunk: i % chunk + batch_size], y_chunk[i % chunk: i % chunk + batch_size]
            z, acts = head.logits(xb, dropout, rng)
            value, grad = loss(z, yb)
            losses.append(value * len(xb))
            head.backward(acts, grad, dropout, grad_views)
            adam.step()
        history["loss"].append(float(np.sum(losses) / len(x_tr)))
        if not np.isfinite(history["loss"][-1]):
            break  # diverged: the caller refuses the model (check_converged), no validation on NaN scores
        if has_val:
            zv, _ = head.logits(x_va)
            val_loss, val_map = validation_metrics(zv, y_va)
            history["val_loss"].append(val_loss)
            history["val_map"].append(val_map)
        better = stopper.update(history[mon][-1], epoch + 1)
        if better:
            best_weights = [w.copy() for w in head.weights]
        if progress and (epoch + 1) % max(25, epochs // 4) == 0:  # a few summary lines, not one per epoch
            shown = ", ".join(f"{k} {vals[-1]:.4f}" for k, vals in history.items())
            log.info("train: epoch %d/%d: %s", epoch + 1, epochs, shown)
        if stopper.stop:
            break
    head.weights = best_weights if patience > 0 and best_weights is not None else [w.copy() for w in head.weights]
    return head, history, mon


class EarlyStopping:
    """The one early-stopping rule (the head's fits and fine-tuning): the monitored value of each epoch,
    lower is better for a loss and higher for mAP; stop after ``patience`` epochs without a better one
    (never with ``patience`` 0). ``best_epoch`` is the first epoch that reached the best value."""

    def __init__(self, monitor: str, patience: int):
        self.monitor, self.patience = monitor, patience
        self.best: float | None = None
        self.since = self.best_epoch = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record ``epoch``'s value; whether it is the best so far."""
        better = self.best is None or (value < self.best if self.monitor.endswith("loss") else value > self.best)
        if better:
            self.best, self.since, self.best_epoch = value, 0, epoch
        else:
            self.since += 1
        return better

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.since >= self.patience


def best_epoch(history: dict, monitor: str) -> int:
    """The epoch (from 1) a fit keeps: the first with the lowest loss or the highest mAP."""
    values = history[monitor]
    return int(np.argmin(values) if monitor.endswith("loss") else np.argmax(values)) + 1


def fit_and_refit(x_tr, y_tr, x_va, y_va, x_all, y_all, *, epochs: int, patience: int, monitor: str,
                  progress: bool = False, **settings):
    """``fit_head`` on the training rows with validation, then the same head fitted afresh on ``x_all``
    (train+val) for the epoch count the first one chose (``train.refit``), one after the other.

    (Last round the refit ran beside the first fit in a forked process: 13.6 s less at 10,000 images, under 5% of
    a 10,000-image ``dvc repro`` with the defaults, and a fork of a process with threads. In a thread of this
    process it was slower than one after the other: ``benchmarks/head_fits.py``.)

    Returns:
        ``(head, history, monitored key, refitted NumpyHead)``; the last is None when the first fit
        never finished a finite epoch (it diverged at once).
    """
    head, history, mon = fit_head(x_tr, y_tr, x_va, y_va, epochs=epochs, patience=patience, monitor=monitor,
                                  progress=progress, **settings)
    if not history["loss"] or not np.isfinite(history[mon]).any():
        return head, history, mon, None  # diverged in its first epoch: check_converged says so
    refit, _, _ = fit_head(x_all, y_all, None, None, epochs=best_epoch(history, mon), patience=0, monitor=monitor,
                           **settings)
    return head, history, mon, refit


def fold_gradient(loss: HeadLoss, z: np.ndarray, y: np.ndarray, own: np.ndarray) -> np.ndarray:
    """The gradient at ``FoldHeads`` logits ``z`` (rows, k, labels) of each head's mean loss over its own
    rows (``own``: rows x k, True where the row trains head f); other rows give zero."""
    _, grad = loss(z, y[:, None, :])  # the mean over all rows and labels, every head at once
    counts = np.maximum(own.sum(axis=0), 1)
    grad *= (own * (len(z) / counts).astype(np.float32))[:, :, None]
    return grad


@one_blas_thread
def fit_fold_heads(x: np.ndarray | Rows, y: np.ndarray, row_fold: np.ndarray, k: int, *, learning_rate: float,
                   epochs: int, batch_size: int, hidden_units: int, dropout: float, seed: int,
                   loss: HeadLoss, folds: list[int] | None = None) -> list[NumpyHead]:
    """The heads of ``folds`` (default: all ``k``) fitted side by side (``FoldHeads``) in one pass over
    the rows: head ``f`` learns from the rows whose ``row_fold`` is not ``f`` (cross-fitting's
    refits), for ``epochs`` epochs, with no validation. Returns them in the order of ``folds``.

    Each step draws ``batch_size * k / (k - 1)`` rows, so each head gets about ``batch_size`` of
    its own rows per step, and as many steps per epoch as a refit on its folds alone. The refits
    are bound by per-step overhead and by reading the rows, not by arithmetic, so all k cost
    about what one refit cost.
    """
    folds = list(range(k)) if folds is None else list(folds)
    rng = np.random.default_rng(seed)
    x = fit_rows(x)
    y = np.asarray(y, np.float32)
    row_fold = np.asarray(row_fold)
    heads = FoldHeads(x.shape[1], y.shape[1], hidden_units, len(folds), rng)
    mine = np.array(folds)
    adam = FlatAdam(heads.weights, learning_rate)
    heads.weights = adam.weights
    step_rows = max(int(round(batch_size * k / (k - 1))), 1)
    chunk = step_rows * 64
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(order), step_rows):
            if i % chunk == 0:
                idx = order[i: i + chunk]
                x_chunk, y_chunk, f_chunk = x[idx], y[idx], row_fold[idx]
            at = slice(i % chunk, i % chunk + step_rows)
            z, acts = heads.logits(x_chunk[at], dropout, rng)
            grad = fold_gradient(loss, z, y_chunk[at], f_chunk[at][:, None] != mine)
            heads.backward(acts, grad, dropout, adam.grads)
            adam.step()
    return [heads.head(i) for i in range(len(folds))]


def check_converged(head: NumpyHead, history: dict, learning_rate: float) -> None:
    """Never hand on a model whose loss or weights went NaN or infinite (a too-high learning rate)."""
    for key, values in history.items():
        bad = [i for i, v in enumerate(values) if not np.isfinite(v)]
        if bad:
            raise MltagError(f"training diverged: {key} is {values[bad[0]]} from epoch {bad[0] + 1}; lower "
                             f"train.learning_rate (now {learning_rate}) and check the vectors")
    if not all(np.isfinite(w).all() for w in head.weights):
        raise MltagError(f"training diverged: the head's weights are not finite; lower train.learning_rate "
                         f"(now {learning_rate})")


