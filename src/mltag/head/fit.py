"""The head: its numpy trainer (fit) and scoring (and the Keras model of folders from before head.npz).

One model, one implementation: ``NumpyHead`` trains it (mini-batch Adam, Keras' defaults,
dropout, early stopping), and its weights are what ``head.npz`` and the end-to-end
``model.tflite`` hold. Steps that only score cached vectors (evaluate, calibrate's refits,
suggest) run it in numpy and never import TensorFlow.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mltag.data.formats import check_output_width, read_model_meta
from mltag.errors import MltagError
from mltag.tf_runtime import import_tensorflow

log = logging.getLogger("mltag.steps.train")

# Training rows up to this size (float32 bytes) are cast once per fit; larger sets (hundreds of
# thousands of images with their views) stay float16 and are cast a chunk at a time.
FLOAT32_COPY_MAX = 512 << 20


def build_head(dim: int, n_labels: int, hidden_units: int, dropout: float):
    import_tensorflow()  # keras' TF backend: without its start-up noise
    import keras

    inputs = keras.Input((dim,), name="features")
    x = inputs
    if dropout > 0:
        x = keras.layers.Dropout(dropout)(x)
    if hidden_units > 0:
        x = keras.layers.Dense(hidden_units, activation="relu", name="hidden")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(n_labels, activation="sigmoid", name="scores")(x)
    return keras.Model(inputs, outputs, name="mltag_head")


class Rows:
    """Training rows without copying them: ``plain[plain_idx]`` then every view of ``views[view_idx]``.

    Indexing with an array of row numbers returns those rows as float32, so a fit holds the
    stored float16 vectors once and casts one batch at a time (at 300k images with 4 views,
    2.2 GB instead of the 8.6 GB that float32 copies and a concatenation took).
    """

    def __init__(self, plain: np.ndarray, views: np.ndarray | None = None, plain_idx: np.ndarray | None = None,
                 view_idx: np.ndarray | None = None):
        self.plain, self.views = plain, views if views is not None and views.shape[1] else None
        self.plain_idx = np.arange(len(plain)) if plain_idx is None else np.asarray(plain_idx)
        k = self.views.shape[1] if self.views is not None else 0
        self.k = k
        self.view_idx = (np.arange(len(self.views)) if view_idx is None else np.asarray(view_idx)) if k else \
            np.zeros(0, int)
        self.n_plain = len(self.plain_idx)
        self.shape = (self.n_plain + len(self.view_idx) * k, plain.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(idx))
        out = np.empty((len(idx), self.shape[1]), np.float32)
        p = idx < self.n_plain
        out[p] = self.plain[self.plain_idx[idx[p]]]
        if not p.all():
            j = idx[~p] - self.n_plain
            out[~p] = self.views[self.view_idx[j // self.k], j % self.k]
        return out


def with_views(x: np.ndarray, y: np.ndarray, views: np.ndarray | None) -> tuple[Rows, np.ndarray]:
    """Plain vectors plus every augmented view (as ``Rows``, no copy), labels repeated to match."""
    rows = Rows(x, views)
    if rows.k == 0:
        return rows, y
    return rows, np.concatenate([y, np.repeat(y, rows.k, axis=0)])


def glorot(rng: np.random.Generator, fan_in: int, fan_out: int, shape: tuple) -> np.ndarray:
    """glorot_uniform for a Dense layer ``fan_in -> fan_out``, as Keras initialises it (``shape``: that
    layer's kernel, or several heads' kernels side by side)."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, shape).astype(np.float32)


def fit_rows(x: np.ndarray | Rows) -> np.ndarray | Rows:
    """A fit's training rows: cast to float32 once when they fit in ``FLOAT32_COPY_MAX`` (each epoch
    then gathers float32 rows), else left as ``Rows`` to be gathered and cast 64 batches at a time."""
    if not isinstance(x, Rows):
        x = Rows(np.asarray(x))
    return x[np.arange(len(x))] if x.shape[0] * x.shape[1] * 4 <= FLOAT32_COPY_MAX else x


class NumpyHead:
    """The head's Dense layers as numpy arrays: dropout -> [Dense+ReLU -> dropout] -> Dense+sigmoid.

    Training it in numpy (mini-batch Adam, Keras' defaults) is the same algorithm as
    ``keras.Model.fit`` on this head but several times faster on CPU: a step is a few small
    matmuls, where Keras spends 1.5-3 ms of graph dispatch per step. That makes the k-fold
    refits of cross-fitted calibration cheap.
    """

    def __init__(self, dim: int, n_labels: int, hidden_units: int, rng: np.random.Generator):
        sizes = [dim, hidden_units, n_labels] if hidden_units > 0 else [dim, n_labels]
        self.weights: list[np.ndarray] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            self.weights += [glorot(rng, a, b, (a, b)), np.zeros(b, np.float32)]

    @classmethod
    def from_weights(cls, weights: list[np.ndarray]) -> NumpyHead:
        head = cls.__new__(cls)
        head.weights = [np.asarray(w, np.float32) for w in weights]
        return head

    def logits(self, x: np.ndarray, dropout: float = 0.0, rng: np.random.Generator | None = None):
        """Output logits and what backprop (``backward``) needs: each layer's input with dropout's
        zeros but not its 1/(1-p) scale (applied to the layer's product instead: the same value,
        1/300 of the multiplications)."""
        acts = []
        h = x
        n_layers = len(self.weights) // 2
        scale = np.float32(1.0 / (1.0 - dropout)) if dropout > 0 and rng is not None else None
        for i in range(n_layers):
            if scale is not None:
                h = h * dropout_mask(rng, h.shape, dropout)
            acts.append(h)
            z = h @ self.weights[2 * i]
            if scale is not None:
                z *= scale
            z += self.weights[2 * i + 1]
            h = np.maximum(z, 0.0) if i < n_layers - 1 else z
        return h, acts

    def backward(self, acts: list[np.ndarray], grad: np.ndarray, dropout: float, out: list[np.ndarray]) -> None:
        """The loss's gradient with respect to every weight, into ``out`` (arrays shaped like the
        weights), from ``logits``' activations (with dropout) and the gradient at the logits."""
        scale = np.float32(1.0 / (1.0 - dropout)) if dropout > 0 else None
        for layer in range(len(self.weights) // 2 - 1, -1, -1):
            a = acts[layer]  # the layer's input, dropout's zeros in, its scale not
            np.matmul(a.T, grad, out=out[2 * layer])
            if scale is not None:
                out[2 * layer] *= scale
            np.sum(grad, axis=0, out=out[2 * layer + 1])
            if layer > 0:
                grad = grad @ self.weights[2 * layer].T
                # through dropout (its zeros stay zero in a; its scale) and the ReLU
                grad *= (a > 0) * scale if scale is not None else (a > 0)

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = np.empty((len(x), self.weights[-1].shape[0]), np.float32)
        for i in range(0, len(x), 4096):
            z, _ = self.logits(np.asarray(x[i: i + 4096], np.float32))
            out[i: i + 4096] = 1.0 / (1.0 + np.exp(-z))
        return out


def dropout_mask(rng: np.random.Generator, shape: tuple, rate: float) -> np.ndarray:
    """Keep-mask of dropout at ``rate`` (True = kept): one 16-bit draw per value, four per raw 64-bit
    output of the generator (a third of the time of ``rng.random``; the rate is exact to 2e-5)."""
    n = int(np.prod(shape))
    raw = rng.bit_generator.random_raw((n + 3) // 4).view(np.uint16)[:n]
    return (raw >= np.uint16(min(round(rate * 65536), 65535))).reshape(shape)


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


class FlatAdam:
    """Adam (``keras.optimizers.Adam``'s defaults) on one flat vector: ``weights`` and ``grads`` are
    views into it shaped like the arrays given, so a step is one set of array operations, not one
    per weight array."""

    B1, B2, EPS = 0.9, 0.999, 1e-7

    def __init__(self, weights: list[np.ndarray], learning_rate: float):
        self.flat = np.concatenate([w.ravel() for w in weights]).astype(np.float32)
        self.grad = np.zeros_like(self.flat)
        self.weights, self.grads, at = [], [], 0
        for w in weights:
            self.weights.append(self.flat[at: at + w.size].reshape(w.shape))
            self.grads.append(self.grad[at: at + w.size].reshape(w.shape))
            at += w.size
        self.m, self.v, self.upd = np.zeros_like(self.flat), np.zeros_like(self.flat), np.empty_like(self.flat)
        self.learning_rate, self.t = learning_rate, 0

    def step(self) -> None:
        """Apply ``grads`` (filled in by the caller) to ``weights``."""
        b1, b2, upd = self.B1, self.B2, self.upd
        self.t += 1
        lr_t = self.learning_rate * np.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)
        self.m -= self.grad  # m = b1*m + (1-b1)*g, in place: b1*(m-g) + g
        self.m *= b1
        self.m += self.grad
        np.square(self.grad, out=upd)  # v = b2*v + (1-b2)*g^2, likewise
        self.v -= upd
        self.v *= b2
        self.v += upd
        np.sqrt(self.v, out=upd)
        upd += self.EPS
        np.divide(self.m, upd, out=upd)
        upd *= np.float32(lr_t)
        self.flat -= upd


@dataclass(frozen=True)
class HeadLoss:
    """The head's training loss: ``bce`` (binary cross-entropy) or ``asl`` (asymmetric loss,
    Ridnik et al. 2021: positives weighted by ``(1-p)^gamma_pos``, negatives shifted down by
    ``clip`` then weighted by ``p^gamma_neg``; ``gamma_pos = gamma_neg = 2, clip = 0`` is the
    focal loss), on targets smoothed toward 0.5 by ``smoothing``. Validation always reports BCE."""

    kind: str
    gamma_pos: float
    gamma_neg: float
    clip: float
    smoothing: float

    @classmethod
    def of(cls, settings: dict) -> HeadLoss:
        """From ``train.*`` keys (or model.json's head settings; a model from before losses: BCE)."""
        return cls(settings.get("loss", "bce"), float(settings.get("asl_gamma_pos", 0.0)),
                   float(settings.get("asl_gamma_neg", 0.0)), float(settings.get("asl_clip", 0.0)),
                   float(settings.get("label_smoothing", 0.0)))

    def settings(self) -> dict:
        return {"loss": self.kind, "asl_gamma_pos": self.gamma_pos, "asl_gamma_neg": self.gamma_neg,
                "asl_clip": self.clip, "label_smoothing": self.smoothing}

    def __call__(self, z: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        """The mean loss of logits ``z`` against 0/1 targets ``y``, and its gradient with respect to ``z``."""
        if self.smoothing:
            y = y * np.float32(1.0 - self.smoothing) + np.float32(self.smoothing / 2)
        if self.kind == "bce":
            return _bce(z, y), (1.0 / (1.0 + np.exp(-z)) - y) / np.float32(y.size)
        z64, y64 = z.astype(np.float64), y.astype(np.float64)
        p = 1.0 / (1.0 + np.exp(-z64))
        log_p = -np.logaddexp(0.0, -z64)
        gp, gn, clip = self.gamma_pos, self.gamma_neg, self.clip
        pm = np.maximum(p - clip, 0.0)
        log_1m = -np.logaddexp(0.0, z64) if clip == 0 else np.log1p(-pm)
        pos = (1.0 - p) ** gp
        neg = pm ** gn
        loss = -(y64 * pos * log_p + (1.0 - y64) * neg * log_1m)
        d_pos = gp * p * (1.0 - p) ** gp * log_p - (1.0 - p) ** (gp + 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            d_neg_pm = np.where(pm > 0, -gn * pm ** (gn - 1.0) * log_1m if gn else 0.0, 0.0) + neg / (1.0 - pm)
        d_neg = np.where(p > clip, d_neg_pm * p * (1.0 - p), 0.0)
        grad = (y64 * d_pos + (1.0 - y64) * d_neg) / y.size
        return float(loss.mean()), grad.astype(np.float32)


def _bce(z: np.ndarray, y: np.ndarray) -> float:
    """Keras' binary cross-entropy (mean over labels and images), computed stably from logits."""
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def validation_metrics(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Binary cross-entropy and mAP of validation logits ``z`` (what early stopping watches)."""
    from mltag import metrics as M

    ap = M.average_precisions(np.asarray(y), 1.0 / (1.0 + np.exp(-z)))
    return _bce(z, np.asarray(y, np.float32)), float(np.nanmean(ap)) if np.isfinite(ap).any() else 0.0


@one_blas_thread
def fit_head(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray | None, y_va: np.ndarray | None, *,
             learning_rate: float, epochs: int, batch_size: int, hidden_units: int, dropout: float,
             patience: int, monitor: str, seed: int, loss: HeadLoss, progress: bool = False,
             gate=None, after_epoch=None):
    """Fit a fresh head; with validation data and ``patience`` > 0, stop early and keep the best epoch.

    The settings are train's (``train.*``) or, for calibrate's refits, the ones model.json recorded.
    ``gate(e)``, when given, is asked before epoch ``e`` (from 1) and stops the fit when it says
    False; ``after_epoch(e, head, improved)`` is told after each epoch (``fit_and_refit`` paces two
    fits with them). Neither changes what an epoch computes.

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
        if gate is not None and not gate(epoch + 1):
            break
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
        if after_epoch is not None:
            after_epoch(epoch + 1, head, better)
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
    """``fit_head`` on the training rows with validation, and the same head fitted afresh on ``x_all``
    (train+val) for the epoch count the first one chose (``train.refit``).

    Where there are two cores the refit runs beside the first fit in a thread of this process (numpy
    releases the GIL in its array work), never ahead of it: before its epoch ``e`` it waits until the
    first fit has finished epoch ``e``, keeps its weights at the first fit's best epoch so far, and stops
    once the first fit has stopped and it has reached that fit's best epoch. Its head is the one a fit of
    that many epochs on ``x_all`` gives alone (a test checks bit for bit); on one core it runs after.

    Returns:
        ``(head, history, monitored key, refitted NumpyHead)``; the last is None when the first fit
        never finished a finite epoch (it diverged at once).
    """
    from threadpoolctl import threadpool_limits

    from mltag.workers import cpu_threads

    if cpu_threads() < 2:
        head, history, mon = fit_head(x_tr, y_tr, x_va, y_va, epochs=epochs, patience=patience, monitor=monitor,
                                      progress=progress, **settings)
        refit, _, _ = fit_head(x_all, y_all, None, None, epochs=best_epoch(history, mon), patience=0,
                               monitor=monitor, **settings)
        return head, history, mon, refit
    # One BLAS thread for the whole of both fits: the fits' own limits, entered and left by two threads at
    # different times, would otherwise restore each other's settings out of order.
    with threadpool_limits(1, user_api="blas"):
        return _fit_beside_refit(x_tr, y_tr, x_va, y_va, x_all, y_all, epochs=epochs, patience=patience,
                                 monitor=monitor, progress=progress, **settings)


def _fit_beside_refit(x_tr, y_tr, x_va, y_va, x_all, y_all, *, epochs: int, patience: int, monitor: str,
                      progress: bool, **settings):
    """``fit_and_refit`` with the refit in a thread, paced by a queue: the first fit puts ``("epoch", e,
    improved)`` after each epoch and ``("stop", best)`` at its end (best 0 when it failed or was stopped:
    the refit then ends at its next epoch)."""
    import queue
    import threading

    ctl: queue.Queue = queue.Queue()
    outcome: dict = {}

    def refit() -> None:
        kept, done, best, stopped = None, 0, 0, False

        def gate(e: int) -> bool:
            nonlocal done, best, stopped
            while done < e and not stopped:
                msg = ctl.get()
                if msg[0] == "stop":
                    stopped, best = True, msg[1]
                else:
                    done = msg[1]
                    best = msg[1] if msg[2] else best
            return not (stopped and e > best)

        def after(e: int, head: NumpyHead, improved: bool) -> None:
            nonlocal kept
            if best == e:  # the first fit's best so far (it has finished epoch e: the gate waited for it)
                kept = [w.copy() for w in head.weights]

        try:
            fit_head(x_all, y_all, None, None, epochs=epochs, patience=0, monitor=monitor, gate=gate,
                     after_epoch=after, **settings)
            outcome["weights"] = kept
        except Exception as e:  # noqa: BLE001 - reported by the first fit's thread as train's own error
            outcome["error"] = f"{type(e).__name__}: {e}"

    best_so_far = 0

    def publish(e: int, head: NumpyHead, improved: bool) -> None:
        nonlocal best_so_far
        best_so_far = e if improved else best_so_far
        ctl.put(("epoch", e, improved))
        if "error" in outcome:
            raise MltagError(f"train.refit failed: {outcome['error']}")

    worker = threading.Thread(target=refit, name="mltag-refit", daemon=True)
    worker.start()
    finished = False
    try:
        head, history, mon = fit_head(x_tr, y_tr, x_va, y_va, epochs=epochs, patience=patience, monitor=monitor,
                                      progress=progress, after_epoch=publish, **settings)
        finished = True
    finally:  # failed or stopped (Ctrl-C, SIGTERM): the refit ends at its next epoch, not after catching up
        ctl.put(("stop", best_so_far if finished else 0))
        worker.join()
    if "error" in outcome:
        raise MltagError(f"train.refit failed: {outcome['error']}")
    # None: the first fit diverged in its first epoch (check_converged says so)
    weights = outcome.get("weights")
    return head, history, mon, None if weights is None else NumpyHead.from_weights(weights)


class FoldHeads:
    """k heads of one shape side by side, for cross-fitting's refits: the first layer is one matrix
    ``dim x k*units`` (then, with hidden units, one ``hidden x labels`` matrix per head), so one
    step of all k costs about what one head's step costs. Logits are ``(rows, k, labels)``.
    Inputs share one dropout mask (each head still sees plain dropout); hidden units do not."""

    def __init__(self, dim: int, n_labels: int, hidden_units: int, k: int, rng: np.random.Generator):
        self.k, self.hidden, self.n_labels = k, hidden_units, n_labels
        self.units = hidden_units if hidden_units > 0 else n_labels
        # each head's kernels initialised as its own Dense layer's
        self.weights = [glorot(rng, dim, self.units, (dim, k * self.units)), np.zeros(k * self.units, np.float32)]
        if hidden_units > 0:
            self.weights += [glorot(rng, hidden_units, n_labels, (k, hidden_units, n_labels)),
                             np.zeros((k, n_labels), np.float32)]

    def logits(self, x: np.ndarray, dropout: float = 0.0, rng: np.random.Generator | None = None):
        """``(rows, k, labels)`` logits and what ``backward`` needs (as ``NumpyHead.logits``)."""
        w, k = self.weights, self.k
        scale = np.float32(1.0 / (1.0 - dropout)) if dropout > 0 and rng is not None else None
        h0 = x * dropout_mask(rng, x.shape, dropout) if scale is not None else x
        z1 = h0 @ w[0]
        if scale is not None:
            z1 *= scale
        z1 += w[1]
        if not self.hidden:
            return z1.reshape(len(x), k, self.n_labels), (h0, None)
        h1 = np.maximum(z1, 0.0).reshape(len(x), k, self.hidden)
        if scale is not None:
            h1 *= dropout_mask(rng, h1.shape, dropout)
        z = np.matmul(h1.transpose(1, 0, 2), w[2]).transpose(1, 0, 2)
        if scale is not None:
            z *= scale
        z += w[3]
        return z, (h0, h1)

    def backward(self, acts: tuple, grad: np.ndarray, dropout: float, out: list[np.ndarray]) -> None:
        """Every head's gradient from the ``(rows, k, labels)`` gradient at the logits, into ``out``."""
        h0, h1 = acts
        scale = np.float32(1.0 / (1.0 - dropout)) if dropout > 0 else None
        if self.hidden:
            np.matmul(h1.transpose(1, 2, 0), grad.transpose(1, 0, 2), out=out[2])
            if scale is not None:
                out[2] *= scale
            np.sum(grad, axis=0, out=out[3])
            gh = np.matmul(grad.transpose(1, 0, 2), self.weights[2].transpose(0, 2, 1)).transpose(1, 0, 2)
            gh *= (h1 > 0) * scale if scale is not None else (h1 > 0)  # dropout's zeros stay zero in h1
            g1 = gh.reshape(len(h0), self.k * self.hidden)
        else:
            g1 = grad.reshape(len(h0), self.k * self.n_labels)
        np.matmul(h0.T, g1, out=out[0])
        if scale is not None:
            out[0] *= scale
        np.sum(g1, axis=0, out=out[1])

    def head(self, f: int) -> NumpyHead:
        """Head ``f`` alone (a copy of its weights)."""
        cols = slice(f * self.units, (f + 1) * self.units)
        w = self.weights
        parts = [w[0][:, cols], w[1][cols]] + ([w[2][f], w[3][f]] if self.hidden else [])
        return NumpyHead.from_weights([np.array(p) for p in parts])


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
                   loss: HeadLoss, folds: list[int] | None = None, stop=None) -> list[NumpyHead]:
    """The heads of ``folds`` (default: all ``k``) fitted side by side (``FoldHeads``) in one pass over
    the rows: head ``f`` learns from the rows whose ``row_fold`` is not ``f`` (cross-fitting's
    refits), for ``epochs`` epochs, with no validation. Returns them in the order of ``folds``.

    Each step draws ``batch_size * k / (k - 1)`` rows, so each head gets about ``batch_size`` of
    its own rows per step, and as many steps per epoch as a refit on its folds alone. The refits
    are bound by per-step overhead and by reading the rows, not by arithmetic, so all k cost
    about what one refit cost. ``stop`` (a ``threading.Event``), once set, ends the fit at the next epoch.
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
        if stop is not None and stop.is_set():
            break  # the caller failed or was stopped: these heads are not wanted
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


def to_keras(head: NumpyHead | list[np.ndarray], dropout: float):
    """The trained head (or its weights) as a Keras model: what model folders from before ``head.npz`` saved
    (``head.keras``), and the reference a test holds the numpy head to."""
    weights = head.weights if isinstance(head, NumpyHead) else head
    hidden = weights[0].shape[1] if len(weights) == 4 else 0
    model = build_head(weights[0].shape[0], weights[-1].shape[0], hidden, dropout)
    model.set_weights(weights)
    return model


def predict_head(model, features: np.ndarray) -> np.ndarray:
    if isinstance(model, NumpyHead):
        return model.predict(features)
    if len(features) == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    return np.asarray(model.predict(np.asarray(features, np.float32), batch_size=1024, verbose=0), np.float32)


def head_scores(model_dir: str | os.PathLike, features: np.ndarray) -> np.ndarray:
    """Score cached bottleneck vectors with the model folder's head: ``head.npz`` in numpy (no
    TensorFlow import), the very weights the end-to-end ``model.tflite`` holds
    (tests/test_steps.py checks the two agree to 1e-6). A folder from before ``head.npz``
    is scored through Keras."""
    labels = read_model_meta(model_dir)["labels"]
    head = load_head(model_dir, labels)
    if head is None:
        return _keras_head_scores(model_dir, labels, features)
    return head.predict(features)


def check_head_labels(folder: str | os.PathLike, labels: list[str]) -> None:
    """The model's label list (model.json) against the names its head was trained with (head.npz)."""
    from mltag.data.formats import HEAD_FILE, check_same_labels, read_head_labels

    trained = read_head_labels(folder)
    if trained is not None:
        check_same_labels(trained, labels, Path(folder) / "model.json", "model.json",
                          f"the head in {HEAD_FILE} was trained on {', '.join(trained[:6])}"
                          f"{', ...' if len(trained) > 6 else ''}: the folder was edited; restore it or train again")


def load_head(folder: str | os.PathLike, labels: list[str]) -> NumpyHead | None:
    """A folder's ``head.npz`` as a ``NumpyHead``, its output width checked against ``labels``; None
    for a folder from before ``head.npz``."""
    from mltag.data.formats import HEAD_FILE, read_head

    weights = read_head(folder)
    if weights is None:
        return None
    check_output_width(labels, weights[-1].shape[0], Path(folder) / HEAD_FILE)
    check_head_labels(folder, labels)
    return NumpyHead.from_weights(weights)


def _keras_head_scores(model_dir, labels: list[str], features: np.ndarray) -> np.ndarray:
    import_tensorflow()  # keras' TF backend: without its start-up noise
    import keras

    f = Path(model_dir) / "head.keras"
    model = keras.saving.load_model(f, compile=False)
    check_output_width(labels, model.output_shape[-1], f)
    return predict_head(model, features)
