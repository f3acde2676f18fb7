"""The head as numpy arrays: ``NumpyHead`` (a logistic layer, or one ReLU hidden layer), ``FoldHeads`` (k of
them side by side, for calibrate's cross-fitting), their losses (``HeadLoss``: BCE or asymmetric), Adam on one
flat vector, and the training rows (``Rows``: vectors and their augmented views, by index)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Training rows up to this size (float32 bytes) are cast once per fit; larger sets (hundreds of
# thousands of images with their views) stay float16 and are cast a chunk at a time.
FLOAT32_COPY_MAX = 512 << 20


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
            return bce(z, y), (1.0 / (1.0 + np.exp(-z)) - y) / np.float32(y.size)
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


def bce(z: np.ndarray, y: np.ndarray) -> float:
    """Keras' binary cross-entropy (mean over labels and images), computed stably from logits."""
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


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
