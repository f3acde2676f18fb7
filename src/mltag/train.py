"""train: a sigmoid head on cached bottleneck vectors, plus the end-to-end inference model."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from mltag.common import (
    MltagError,
    atomic_path,
    fault_point,
    import_tensorflow,
    read_labels,
    write_json_atomic,
    write_labels,
)
from mltag.formats import (  # noqa: F401 - model_mode re-exported
    check_output_width,
    load_split,
    load_views,
    model_mode,
    read_bottleneck_meta,
    read_model_meta,
    write_integrity,
)


def build_head(dim: int, n_labels: int, hidden_units: int = 0, dropout: float = 0.2):
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


log = logging.getLogger(__name__)


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
            limit = np.sqrt(6.0 / (a + b))  # glorot_uniform, as Keras initialises Dense
            self.weights += [rng.uniform(-limit, limit, (a, b)).astype(np.float32), np.zeros(b, np.float32)]

    def logits(self, x: np.ndarray, dropout: float = 0.0, rng: np.random.Generator | None = None):
        """Output logits and the activations backprop needs."""
        acts = []
        h = x
        n_layers = len(self.weights) // 2
        for i in range(n_layers):
            if dropout > 0 and rng is not None:
                mask = (rng.random(h.shape, dtype=np.float32) >= dropout) / np.float32(1.0 - dropout)
                h = h * mask
            acts.append(h)
            z = h @ self.weights[2 * i] + self.weights[2 * i + 1]
            h = np.maximum(z, 0.0) if i < n_layers - 1 else z
        return h, acts

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = np.empty((len(x), self.weights[-1].shape[0]), np.float32)
        for i in range(0, len(x), 4096):
            z, _ = self.logits(np.asarray(x[i: i + 4096], np.float32))
            out[i: i + 4096] = 1.0 / (1.0 + np.exp(-z))
        return out


def _bce(z: np.ndarray, y: np.ndarray) -> float:
    """Keras' binary cross-entropy (mean over labels and images), computed stably from logits."""
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def validation_metrics(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Binary cross-entropy and mAP of validation logits ``z`` (what early stopping watches)."""
    from mltag import metrics as M

    ap = M.average_precisions(np.asarray(y), 1.0 / (1.0 + np.exp(-z)))
    return _bce(z, np.asarray(y, np.float32)), float(np.nanmean(ap)) if np.isfinite(ap).any() else 0.0


def fit_head(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray | None, y_va: np.ndarray | None, *,
             learning_rate: float, epochs: int, batch_size: int, hidden_units: int, dropout: float,
             patience: int = 0, monitor: str = "val_loss", seed: int = 42, progress: bool = False):
    """Fit a fresh head; with validation data and ``patience`` > 0, stop early and keep the best epoch.

    Returns:
        ``(NumpyHead, history dict, monitored key)``; history holds ``loss`` and, with
        validation data, ``val_loss`` and ``val_map`` per epoch.
    """
    rng = np.random.default_rng(seed)
    if not isinstance(x_tr, Rows):
        x_tr = Rows(np.asarray(x_tr))  # a batch at a time as float32, never the whole array
    y_tr = np.asarray(y_tr, np.float32)
    head = NumpyHead(x_tr.shape[1], y_tr.shape[1], hidden_units, rng)
    has_val = x_va is not None and len(x_va) > 0
    if has_val:
        x_va = np.asarray(x_va, np.float32)  # once, not every epoch
    mon = monitor if has_val else monitor.removeprefix("val_")
    if mon == "map":
        mon = "loss"  # no train mAP is tracked: without validation data, watch the train loss
    b1, b2, eps = 0.9, 0.999, 1e-7  # keras.optimizers.Adam defaults
    m = [np.zeros_like(w) for w in head.weights]
    v = [np.zeros_like(w) for w in head.weights]
    step = 0
    history: dict[str, list[float]] = {"loss": []}
    if has_val:
        history.update(val_loss=[], val_map=[])
    best, best_weights, since = None, None, 0
    n_layers = len(head.weights) // 2
    for epoch in range(epochs):
        order = rng.permutation(len(x_tr))
        losses = []
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            xb, yb = x_tr[idx], y_tr[idx]
            z, acts = head.logits(xb, dropout, rng)
            losses.append(_bce(z, yb) * len(idx))
            grad = (1.0 / (1.0 + np.exp(-z)) - yb) / np.float32(yb.size)
            grads = [None] * len(head.weights)
            for layer in range(n_layers - 1, -1, -1):
                a = acts[layer]
                grads[2 * layer] = a.T @ grad
                grads[2 * layer + 1] = grad.sum(axis=0)
                if layer > 0:
                    grad = grad @ head.weights[2 * layer].T
                    grad = grad * (a > 0)  # through the ReLU (dropout's zeros stay zero in a)
            step += 1
            lr_t = learning_rate * np.sqrt(1 - b2 ** step) / (1 - b1 ** step)
            for j, g in enumerate(grads):
                m[j] = b1 * m[j] + (1 - b1) * g
                v[j] = b2 * v[j] + (1 - b2) * (g * g)
                head.weights[j] -= (lr_t * m[j] / (np.sqrt(v[j]) + eps)).astype(np.float32)
        history["loss"].append(float(np.sum(losses) / len(x_tr)))
        if not np.isfinite(history["loss"][-1]):
            break  # diverged: the caller refuses the model (check_converged), no validation on NaN scores
        if has_val:
            zv, _ = head.logits(x_va)
            val_loss, val_map = validation_metrics(zv, y_va)
            history["val_loss"].append(val_loss)
            history["val_map"].append(val_map)
        value = history[mon][-1]
        better = best is None or (value < best if mon.endswith("loss") else value > best)
        if better:
            best, best_weights, since = value, [w.copy() for w in head.weights], 0
        else:
            since += 1
        if progress and (epoch + 1) % max(25, epochs // 4) == 0:  # a few summary lines, not one per epoch
            shown = ", ".join(f"{k} {vals[-1]:.4f}" for k, vals in history.items())
            log.info("train: epoch %d/%d: %s", epoch + 1, epochs, shown)
        if patience > 0 and since >= patience:
            break
    if patience > 0 and best_weights is not None:
        head.weights = best_weights
    return head, history, mon


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


def to_keras(head: NumpyHead, dropout: float):
    """The trained head as the Keras model saved in the model folder (``head.keras``)."""
    hidden = head.weights[0].shape[1] if len(head.weights) == 4 else 0
    model = build_head(head.weights[0].shape[0], head.weights[-1].shape[0], hidden, dropout)
    model.set_weights(head.weights)
    return model


def predict_head(model, features: np.ndarray) -> np.ndarray:
    if isinstance(model, NumpyHead):
        return model.predict(features)
    if len(features) == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    return np.asarray(model.predict(np.asarray(features, np.float32), batch_size=1024, verbose=0), np.float32)


def train(bottlenecks: str | os.PathLike, out: str | os.PathLike, learning_rate: float = 1e-3, epochs: int = 200,
          batch_size: int = 32, hidden_units: int = 0, dropout: float = 0.2, patience: int = 15,
          monitor: str = "val_loss", seed: int = 42, backbone_cache_dir: str | os.PathLike = "",
          tracking_uri: str | None = None, experiment: str = "mltag", config: dict | None = None,
          progress: bool = True, metrics_file: str | os.PathLike | None = None,
          history_file: str | os.PathLike | None = None, *, mode: str = "head", images: str | os.PathLike | None = None,
          fine_tune_blocks: int = 2, fine_tune_epochs: int = 10, fine_tune_learning_rate: float = 2e-5,
          fine_tune_patience: int = 3, mixed_precision: str = "auto", handle: str | None = None,
          image_size: int = 0) -> dict:
    """Train the head, save it with the end-to-end model, and open the MLflow run.

    Args:
        monitor: ``val_loss`` (lower is better) or ``val_map`` (validation PR-AUC, higher is better).
        mode: ``head`` (the head on cached vectors) or ``fine_tune`` (then also the top
            ``fine_tune_blocks`` blocks of the built-in backbone, from the images under
            ``images``; see ``mltag.finetune``).
        config: the resolved configuration, logged to MLflow and saved beside the outputs.
        handle, image_size: the backbone the caller expects (backbone.*); the model always
            uses the bottlenecks' own backbone, and a mismatch is logged as a warning.
        metrics_file: also write the summary here (DVC metrics).
        history_file: also write per-epoch losses here, one record per epoch (DVC plots).

    Returns:
        Summary dict with the run id and best validation figures.
    """
    import mlflow

    from mltag import backbone as bb
    from mltag import tracking
    from mltag.engine import require_gpu
    from mltag.model import export_inference_model, export_tflite

    require_gpu("train")
    if monitor not in ("val_loss", "val_map"):
        raise MltagError(f"train.monitor must be val_loss or val_map, got {monitor!r}")
    if mode not in ("head", "fine_tune"):
        raise MltagError(f"train.mode must be head or fine_tune, got {mode!r}")
    meta = read_bottleneck_meta(bottlenecks)
    for key, want in (("backbone_handle", handle), ("image_size", image_size)):
        if want and str(meta.get(key)) != str(want):  # train follows the bottlenecks; say so once
            log.warning("train: the bottlenecks in %s were computed with %s %r, not backbone.%s %r; training on "
                        "them (rerun the bottleneck step for %r)", bottlenecks, key, meta.get(key),
                        key.replace("backbone_", ""), want, want)
    if mode == "fine_tune":
        from mltag.finetune import builtin_name

        builtin_name(meta["backbone_handle"])  # fail before any work
        if images is None or not Path(images).is_dir():
            raise MltagError("train.mode fine_tune reads the images: pass the prepared folder (--prepared)", images)
    labels = read_labels(Path(bottlenecks) / "labels.txt")
    x_tr, y_tr, p_tr = load_split(bottlenecks, "train")
    x_va, y_va, p_va = load_split(bottlenecks, "val")
    x_fit, y_fit = with_views(x_tr, y_tr, load_views(bottlenecks, "train"))
    if len(x_tr) == 0:
        raise MltagError("the train split is empty", Path(bottlenecks) / "train.npz")
    resolved = bb.resolve(meta["backbone_handle"], backbone_cache_dir)
    if resolved.backbone_id != meta["backbone_id"]:
        raise MltagError(f"backbone changed since the bottleneck step ({meta['backbone_id']} -> "
                         f"{resolved.backbone_id}); rerun bottleneck")

    hparams = {"learning_rate": learning_rate, "epochs": epochs, "batch_size": batch_size,
               "hidden_units": hidden_units, "dropout": dropout, "seed": seed}
    uri = tracking.setup_checked(tracking_uri)
    exp = mlflow.set_experiment(experiment)
    tracking.close_stale_runs(exp.experiment_id, out)
    t0 = time.time()
    with mlflow.start_run(tags=tracking.owner_tags(out)) as run:
        params = tracking.flatten(config or {})
        params.update({"train.backbone_id": resolved.backbone_id, "train.n_labels": len(labels),
                       "train.n_train": len(x_tr), "train.n_train_vectors": len(x_fit), "train.n_val": len(x_va)})
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.set_tags({"mltag.step": "train", "mltag.labels": ",".join(labels)})
        fault_point("train:fitting")
        head, history, mon = fit_head(x_fit, y_fit, x_va, y_va, patience=patience, monitor=monitor,
                                      progress=progress, **hparams)
        check_converged(head, history, learning_rate)
        ft = None
        if mode == "fine_tune":
            net, head.weights, ft = _fine_tune(meta, images, p_tr, y_tr, p_va, y_va, head.weights, blocks=fine_tune_blocks,
                                               epochs=fine_tune_epochs, learning_rate=fine_tune_learning_rate,
                                               patience=fine_tune_patience, batch_size=batch_size, dropout=dropout,
                                               seed=seed, mixed_precision=mixed_precision, progress=progress)
        model = to_keras(head, dropout)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        per_epoch = [Metric(f"epoch_{k}", v[e], now, e) for k, v in history.items() for e in range(len(v))]
        if ft is not None:
            per_epoch += [Metric(f"fine_tune_{k}", ft[k][e], now, e) for k in ("loss", "val_loss", "val_map")
                          for e in range(len(ft[k]))]
        for i in range(0, len(per_epoch), 1000):  # one request per 1000 values, not one per epoch
            mlflow.MlflowClient().log_batch(run.info.run_id, metrics=per_epoch[i: i + 1000])
        values = history[mon]
        best = int(np.argmin(values) if mon.endswith("loss") else np.argmax(values))
        summary = {
            "run_id": run.info.run_id,
            "epochs_run": len(values),
            "best_epoch": best + 1,
            "train_loss": history["loss"][best],
            "val_loss": history.get("val_loss", [None] * len(values))[best],
            "val_map_pr_auc": history.get("val_map", [None] * len(values))[best],
            "seconds": round(time.time() - t0, 2),
            "mode": mode,
        }
        if ft is not None:
            summary.update({"fine_tune_best_epoch": ft["best_epoch"], "fine_tune_epochs_run": len(ft["loss"]),
                            "fine_tune_val_loss": ft["val_loss"][ft["best_epoch"] - 1] if ft["val_loss"] else None,
                            "fine_tune_val_map": ft["val_map"][ft["best_epoch"] - 1] if ft["val_map"] else None,
                            "fine_tune_seconds": ft["seconds"]})
        mlflow.log_metrics({f"train_{k}": v for k, v in summary.items() if isinstance(v, float)})
        out = Path(out)
        with atomic_path(out) as tmp:
            tmp.mkdir(parents=True)
            model.save(tmp / "head.keras")
            if ft is None:
                export_inference_model(resolved.location, [w for w in model.get_weights()], meta["image_size"],
                                       tmp / "inference")
            else:  # the tuned backbone, written as a SavedModel the same way as the built-in one
                import tempfile

                with tempfile.TemporaryDirectory(dir=tmp) as scratch:
                    tuned = bb.build_builtin(net.name, Path(scratch) / "backbone", net.state_dict())
                    export_inference_model(str(tuned), [w for w in model.get_weights()], meta["image_size"],
                                           tmp / "inference")
            try:  # the same model for LiteRT: what predict, TTA and serving run on CPU
                export_tflite(tmp / "inference", tmp / "model.tflite")
            except MltagError as e:
                log.warning("train: no model.tflite (%s); inference will use TF", e)
            (tmp / "model.json").write_text(json.dumps({
                "labels": labels, "image_size": meta["image_size"], "backbone_handle": meta["backbone_handle"],
                "backbone_id": resolved.backbone_id, "preprocessing": meta["preprocessing"],
                "feature_dim": int(x_tr.shape[1]), "hidden_units": hidden_units,
                # what calibrate needs to refit the same head on folds
                "head": {**hparams, "best_epoch": best + 1, "views": int(meta.get("views", 1))},
                # fine_tune: cached vectors no longer match the backbone; evaluate scores images end to end
                "mode": mode,
                **({"fine_tune": {"blocks": fine_tune_blocks, "tuned_blocks": ft["tuned_blocks"],
                                  "learning_rate": fine_tune_learning_rate, "epochs": fine_tune_epochs,
                                  "patience": fine_tune_patience, "best_epoch": ft["best_epoch"],
                                  "mixed_precision": ft["mixed_precision"]}} if ft else {})},
                indent=2) + "\n", encoding="utf-8")
            write_labels(tmp / "labels.txt", labels)
            (tmp / "history.json").write_text(json.dumps(
                history if ft is None else {**history, "fine_tune": {k: ft[k] for k in ("loss", "val_loss", "val_map")}},
                indent=2) + "\n", encoding="utf-8")
            (tmp / "config.json").write_text(json.dumps(config or {}, indent=2) + "\n", encoding="utf-8")
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
            tracking.save_run_ref(tmp, run.info.run_id, run.info.experiment_id, uri, experiment)
            digest = write_integrity(tmp)
            mlflow.set_tag(tracking.MODEL_DIGEST_TAG, digest)
        records = [{"epoch": i + 1, **{k: v[i] for k, v in history.items()}} for i in range(len(values))]
        if metrics_file:
            write_json_atomic(metrics_file, summary)
        if history_file:
            write_json_atomic(history_file, records)
        mlflow.log_artifact(str(out / "history.json"))
        mlflow.log_artifact(str(out / "config.json"))
    return summary


def _fine_tune(meta: dict, images, p_tr, y_tr, p_va, y_va, head_weights, **kw):
    """Run ``finetune.fine_tune`` on the train and val images (paths as listed in the bottleneck folder)."""
    from mltag.bottleneck import hash_files
    from mltag.finetune import fine_tune

    items = {}
    for split, paths in (("train", p_tr), ("val", p_va)):
        files = [Path(images) / str(p) for p in paths]
        for f in files:
            if not f.is_file():
                raise MltagError("image not found (train.mode fine_tune reads the images)", f)
        items[split] = list(zip(files, hash_files(files)))
    return fine_tune(meta["backbone_handle"], int(meta["image_size"]), items["train"], y_tr, items["val"], y_va,
                     head_weights, views=int(meta.get("views", 1)), **kw)


def head_scores(model_dir: str | os.PathLike, features: np.ndarray) -> np.ndarray:
    """Score cached bottleneck vectors with the saved head (same weights as the end-to-end model)."""
    import_tensorflow()  # keras' TF backend: without its start-up noise
    import keras

    labels = read_model_meta(model_dir)["labels"]
    f = Path(model_dir) / "head.keras"
    model = keras.saving.load_model(f, compile=False)
    check_output_width(labels, model.output_shape[-1], f)
    return predict_head(model, features)
