"""train.mode fine_tune: train the top blocks of a built-in backbone together with the head.

The bottom of the network (stem and blocks ``[0, n - fine_tune_blocks)``) stays frozen, so
its output for an image view never changes. Each training image's views (the plain one
and ``views - 1`` augmented ones: random resized crop, flip, colour jitter, the same
views the bottleneck step caches) go through the frozen bottom once (on CPU through LiteRT,
the bottom converted once per backbone and block count, as the bottleneck step runs the
backbone); the resulting
feature maps are kept in memory as float16 and every epoch trains the unfrozen top blocks
and the head on them. That makes fine-tuning affordable on CPU (the frozen part costs one
forward pass per view, not one per epoch) and fast on GPU.

* Warm start: the head starts from the head fitted on the cached vectors, so the first
  gradient steps do not wreck the pretrained top blocks with a random head's errors.
* Learning rates: ``fine_tune_learning_rate`` for the top block (and the head convolution),
  ``fine_tune_lr_decay`` times less for each block below it (layer-wise decay; 1 by
  default: one rate), and ten times the top's for the head; ``fine_tune_schedule: cosine``
  warms them up over the first epoch and decays them to 0 at ``fine_tune_epochs``.
* Batch norm keeps its moving statistics (inference mode) in every block: batch
  statistics from small batches would be noise. Its scale and offset train in the
  unfrozen blocks (``fine_tune_bn: affine``), or stay too (``frozen``).
* Early stopping on validation loss (``fine_tune_patience``), best epoch restored.
* On a GPU the unfrozen blocks run in float16 (mixed precision, fp32 master weights,
  dynamic loss scaling); on CPU in float32.
* Checkpoints: after every epoch the whole state (tuned weights, optimizer slots, loss scale,
  the shuffling generator, history, early stopping, the best weights so far) goes to one file
  named by everything that decides the result (``Checkpoint``). A rerun on the same inputs, after a
  preempted pod or a kill, resumes after the last finished epoch, and ends as an uninterrupted run
  would: dropout masks are drawn from (seed, step), not from a generator's state. A finished run's
  file is removed by train once the model is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from mltag import config
from mltag.backbones.builtin import split_colour
from mltag.errors import MltagError
from mltag.files import fault_point, process_token
from mltag.tf_runtime import import_tensorflow
from mltag.workers import imap_ordered

log = logging.getLogger(__name__)
HEAD_LR_FACTOR = 10.0


def builtin_name(handle: str) -> str:
    """The built-in a ``builtin:NAME`` handle names (single-scale or ``_ms``, ``+colour`` or not); anything else is
    refused."""
    from mltag.backbones.builtin import BUILTINS
    from mltag.backbones.colour import COLOUR

    name = str(handle).strip().removeprefix("builtin:")
    if not str(handle).startswith("builtin:") or split_colour(name)[0] not in BUILTINS:
        raise MltagError(f"train.mode fine_tune needs a built-in backbone (backbone.handle: builtin:NAME, one of "
                         f"{', '.join(BUILTINS)}, each also with +{COLOUR}), got {handle!r}; use train.mode head "
                         "for other modules")
    return name


def _pixels(paths: list[Path], shas: list[str], view: int, size: int) -> np.ndarray:
    from mltag.inference.lanes import decode_view

    return np.stack(list(imap_ordered(lambda item: decode_view(*item, view, size), list(zip(paths, shas)))))


def lr_schedule(kind: str, epochs: int, steps_per_epoch: int):
    """The learning-rate factor of each step (from 0), or None for a constant rate. ``cosine``: a
    linear warm-up over the first epoch (when there are several), then a cosine decay to 0 at
    the last step of ``epochs``."""
    if kind == "constant":
        return None
    total = max(1, epochs * steps_per_epoch)
    warm = steps_per_epoch if epochs > 1 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + np.cos(np.pi * min(1.0, (step - warm) / max(1, total - warm - 1))))

    return factor


CHECKPOINT_FORMAT = 1
KEY_FIELDS = ("fine_tune_blocks", "fine_tune_epochs", "fine_tune_learning_rate", "fine_tune_patience",
              "fine_tune_lr_decay", "fine_tune_schedule", "fine_tune_bn", "batch_size", "dropout", "seed", "monitor")


class Checkpoint:
    """Fine-tuning's state after its last finished epoch, in one ``.npz`` under ``root`` (a folder, or an fsspec URI
    such as the shared vector store's bucket), named by ``key``: a rerun on the same inputs finds it, any other
    does not. Written whole by rename (a folder) or as one object (a bucket): a kill mid-write leaves the last one."""

    def __init__(self, root: str | os.PathLike, key: str):
        from mltag.data.fetch import is_remote

        self.name = f"finetune-{key[:40]}.npz"
        self.uri = f"{str(root).rstrip('/')}/{self.name}"
        self.remote = None
        if is_remote(str(root)):
            import fsspec

            self.remote, base = fsspec.core.url_to_fs(str(root))
            self.where = f"{base.rstrip('/')}/{self.name}"
        else:
            self.where = str(Path(str(root).removeprefix("file://")) / self.name)

    def __str__(self) -> str:
        return self.uri

    def load(self) -> tuple[dict, dict[str, np.ndarray]] | None:
        """``(meta, arrays)``, or None when there is none (or it cannot be read: then it is started over)."""
        try:
            data = self.remote.cat_file(self.where) if self.remote is not None else Path(self.where).read_bytes()
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(str(arrays.pop("meta")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as e:
            log.warning("fine-tune: the checkpoint %s cannot be read (%s); starting over", self.where, e)
            return None
        return (meta, arrays) if meta.get("format") == CHECKPOINT_FORMAT else None

    def save(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps({**meta, "format": CHECKPOINT_FORMAT})), **arrays)
        try:
            if self.remote is not None:
                self.remote.pipe_file(self.where, buf.getvalue())
                return
            path = Path(self.where)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{process_token()}.tmp")
            try:
                tmp.write_bytes(buf.getvalue())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as e:  # a checkpoint is insurance: a full disk costs the resume, not the run
            log.warning("fine-tune: cannot write the checkpoint %s (%s); a rerun would start over", self.where,
                        e.strerror or e)



def remove_checkpoint(uri: str) -> None:
    """Remove a finished fine-tuning's checkpoint (``str(Checkpoint)``) once its model is written."""
    from mltag.data.fetch import is_remote

    try:
        if is_remote(uri):
            import fsspec

            fs, path = fsspec.core.url_to_fs(uri)
            fs.rm_file(path)
        else:
            Path(uri.removeprefix("file://")).unlink()
    except OSError as e:
        log.warning("fine-tune: cannot remove the finished checkpoint %s (%s)", uri, e.strerror or e)


def checkpoint_key(handle: str, image_size: int, views: int, half: bool, train: config.Train, items: list,
                   arrays: list[np.ndarray]) -> str:
    """What decides fine-tuning's result: the backbone, its input size, the views, the fine-tune settings, each
    image's content in order, the labels and the warm-start head."""
    from mltag import __version__

    h = hashlib.sha256(json.dumps({"handle": handle, "image_size": image_size, "views": views, "half": half,
                                   "mltag": __version__, **{k: getattr(train, k) for k in KEY_FIELDS}},
                                  sort_keys=True).encode())
    for _, sha in items:
        h.update(sha.encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _frozen_bottom(name: str, k: int, image_size: int, backbone_cache, net):
    """``uint8 pixels [B,S,S,3] -> tuple of float arrays``: what the frozen blocks ``[0, k)`` hand the tuned
    ones. A single-scale built-in: ``(feature maps,)``, through LiteRT when no GPU is visible (one
    single-threaded interpreter per core, splitting each batch; the bottom converted once per backbone
    and ``k``), else TF; LiteRT that cannot convert falls back to TF with one line saying why. An ``_ms``
    built-in: ``(maps at the input size, maps at the second scale, MID_WEIGHT x the two scales' mean
    pooled middle stages below k)``, through TF. ``+colour``: the photo's colour numbers after those (they
    need no tuning: a function of the pixels alone)."""
    tf = import_tensorflow()

    from mltag.backbones.colour import colour_vector

    name, colour = split_colour(name)
    bottom = _network_bottom(tf, name, k, image_size, backbone_cache, net)
    if not colour:
        return bottom
    run_colour = tf.function(colour_vector)
    return lambda px: bottom(px) + (run_colour(tf.constant(px, tf.float32) / 255.0).numpy(),)


def _network_bottom(tf, name: str, k: int, image_size: int, backbone_cache, net):
    from mltag.backbones.builtin import MID_WEIGHT, is_multiscale
    from mltag.inference.engine import LiteRTEngine, litert_bottom, resolve_engine
    from mltag.workers import cpu_threads

    if is_multiscale(name):
        def two_scales(x):
            small = tf.image.resize(x, net.small_size(tf.shape(x)[1:3]), "bilinear")
            (big_map, big_mids), (small_map, small_mids) = net.bottom_levels(x, k), net.bottom_levels(small, k)
            mids = [MID_WEIGHT * 0.5 * (a + b) for a, b in zip(big_mids, small_mids)]
            return big_map, small_map, tf.concat(mids, axis=1) if mids else tf.zeros([tf.shape(x)[0], 0])

        run_ms = tf.function(two_scales)
        return lambda px: tuple(t.numpy() for t in run_ms(tf.constant(px, tf.float32) / 255.0))
    if resolve_engine("auto") == "litert":
        try:
            engine = LiteRTEngine(litert_bottom(name, k, image_size, backbone_cache), threads=1,
                                  parallel=cpu_threads())
            return lambda px: (engine(px),)
        except (MltagError, ValueError, RuntimeError) as e:
            log.warning("fine-tune: the frozen blocks run through TF: %s", e)
    run = tf.function(lambda x: net.bottom(x, k))
    return lambda px: (run(tf.constant(px, tf.float32) / 255.0).numpy(),)


def fine_tune(handle: str, image_size: int, train_items: list[tuple[Path, str]], y_tr: np.ndarray,
              val_items: list[tuple[Path, str]], y_va: np.ndarray, head_weights: list[np.ndarray], *,
              train: config.Train, views: int, progress: bool, backbone_cache: str | os.PathLike | None,
              checkpoints: str | os.PathLike | None = None):
    """Fine-tune the top ``train.fine_tune_blocks`` blocks of built-in ``handle`` and the head.

    Args:
        train_items, val_items: ``(image path, content sha256)`` per image; the sha seeds the
            augmented views exactly as the bottleneck step does.
        head_weights: the warm-start head (kernel, bias per Dense layer).
        backbone_cache: where the frozen bottom's LiteRT conversion is kept (``backbone.cache_dir``).
        checkpoints: where each epoch's ``Checkpoint`` goes (a folder or an fsspec URI); None: none.
        train: the train section: ``fine_tune_*``, ``batch_size``, ``dropout``, ``seed``,
            ``mixed_precision`` and ``monitor`` (the best epoch is the lowest ``val_loss`` or the
            highest ``val_map``, as in the head's fit).

    Returns:
        ``(LiteNet with the tuned weights, head weights, history dict)``; the history's ``checkpoint`` is the
        file to remove once the model is written, ``resumed_after`` the epochs a checkpoint held.
    """
    tf = import_tensorflow()
    from mltag.backbones.builtin import LiteNet, base_name
    from mltag.inference.engine import gpu_visible

    blocks = train.fine_tune_blocks
    name = builtin_name(handle)
    net = LiteNet(base_name(split_colour(name)[0]))
    net.export_name = name  # the tuned weights are written as this built-in (``_ms``: the two-scale vector)
    if not 1 <= blocks <= net.n_blocks:
        raise MltagError(f"train.fine_tune_blocks must be 1..{net.n_blocks} for {name}, got {blocks}")
    half = gpu_visible() if train.mixed_precision == "auto" else train.mixed_precision == "true"
    k = net.n_blocks - blocks
    tf.random.set_seed(train.seed)
    t0 = time.perf_counter()
    ckpt = state = None
    if checkpoints:
        ckpt = Checkpoint(checkpoints, checkpoint_key(handle, image_size, views, half, train, train_items + val_items,
                                                      [np.asarray(y_tr), np.asarray(y_va), *head_weights]))
        state = ckpt.load()
    # 1. The frozen bottom, once per view: through LiteRT on CPU (one single-threaded interpreter per
    # core, as the bottleneck step runs the backbone), through TF where TF has a GPU. Not when a checkpoint
    # holds the finished result.
    x_tr = y_fit = x_va = None
    if state is None or not state[0]["done"]:
        x_tr, y_fit, x_va = _frozen_features(name, net, k, image_size, backbone_cache, train_items, y_tr, val_items,
                                             views, progress)
    # 2. Top blocks + head, a learning rate per block, early stopping as the head's fit stops.
    top = _TopTrainer(tf, net, k, half, head_weights, train, len(train_items) * views)
    history = top.fit(x_tr, y_fit, x_va, y_va, train, np.random.default_rng(train.seed), progress, ckpt, state)
    history["seconds"] = round(time.perf_counter() - t0, 1)
    history["checkpoint"] = str(ckpt) if ckpt is not None else None
    history["mixed_precision"] = half
    history["tuned_blocks"] = list(range(k, net.n_blocks))
    return net, [v.numpy() for v in top.head_vars], history


def _frozen_features(name: str, net, k: int, image_size: int, backbone_cache, train_items, y_tr, val_items,
                     views: int, progress: bool):
    """The feature maps of the frozen blocks 0..k-1: every training image in each of its ``views``, and the
    validation images plain. Returns ``(x_train, y_train tiled per view, x_val or None)``."""
    from tqdm import tqdm

    bottom = _frozen_bottom(name, k, image_size, backbone_cache, net)
    n_views = len(train_items) * views + len(val_items)
    bar = tqdm(total=n_views, desc=f"fine-tune: frozen blocks 0-{k - 1}, {views} view(s)", unit="img", leave=False,
               disable=not progress)

    def maps(items, view):
        out = []
        paths, shas = [p for p, _ in items], [s for _, s in items]
        chunks = [(paths[i: i + 32], shas[i: i + 32]) for i in range(0, len(items), 32)]
        # the next batch decodes while this one runs through the frozen blocks
        for px in imap_ordered(lambda c: _pixels(c[0], c[1], view, image_size), chunks, workers=1, ahead=2):
            out.append(tuple(a.astype(np.float16) for a in bottom(px)))
            bar.update(len(px))
        return tuple(np.concatenate(parts) for parts in zip(*out)) if out else None

    t0 = time.perf_counter()
    per_view = [maps(train_items, v) for v in range(views)]
    x_tr = tuple(np.concatenate(parts) for parts in zip(*per_view))
    y_fit = np.tile(np.asarray(y_tr, np.float32), (views, 1))
    x_va = maps(val_items, 0) if val_items else None
    bar.close()
    held = sum(a.nbytes for a in x_tr + (x_va or ()))
    log.info("fine-tune: %d feature maps %s from the frozen blocks in %.0f s (%.0f MB in memory)",
             len(x_tr[0]) + (0 if x_va is None else len(x_va[0])), tuple(x_tr[0].shape[1:]),
             time.perf_counter() - t0, held / 1e6)
    return x_tr, y_fit, x_va


def _take(x: tuple, idx) -> tuple:
    return tuple(a[idx] for a in x)


class _TopTrainer:
    """The tuned top blocks (from block ``k``) and the head: one Adam per tuned block (top first), each at
    ``fine_tune_learning_rate x lr_decay^depth``, the head at ten times the top's; the schedule scales every
    rate, step by step; with ``half``, float16 compute with dynamic loss scaling."""

    colour = False  # whether the frozen part's last array is the photo's colour numbers (``+colour``)

    def __init__(self, tf, net, k: int, half: bool, head_weights: list[np.ndarray], train: config.Train, n_rows: int):
        self.tf, self.net, self.k, self.half = tf, net, k, half
        self.colour = split_colour(net.export_name)[1]  # the frozen part's last array: colour numbers
        self.dtype = "float16" if half else "float32"
        self.dropout, self.seed = train.dropout, int(train.seed)
        self.kernels = [tf.Variable(w, name=f"head_kernel_{i}") for i, w in enumerate(head_weights[0::2])]
        self.biases = [tf.Variable(b, name=f"head_bias_{i}") for i, b in enumerate(head_weights[1::2])]
        self.head_vars = [v for pair in zip(self.kernels, self.biases) for v in pair]
        groups = net.block_groups(k, bn_affine=train.fine_tune_bn == "affine")
        self.tuned = [v for g in groups for v in g]
        lr = train.fine_tune_learning_rate
        self.base_rates = [lr * train.fine_tune_lr_decay ** d for d in range(len(groups))] + [lr * HEAD_LR_FACTOR]
        self.opts = [tf.keras.optimizers.Adam(r) for r in self.base_rates]
        for o, g in zip(self.opts, groups + [self.head_vars]):
            o.build(g)  # optimizer slots exist before the graph is traced
        self.bounds = np.cumsum([0] + [len(g) for g in groups + [self.head_vars]])
        self.steps_per_epoch = -(-n_rows // train.batch_size)
        self.schedule = lr_schedule(train.fine_tune_schedule, train.fine_tune_epochs, self.steps_per_epoch)
        self.scale = tf.Variable(2.0 ** 12 if half else 1.0, trainable=False, dtype=tf.float32)
        self.step = tf.function(self._step)
        self.logit_fn = tf.function(lambda x: self.logits(x, False))

    def features(self, x):
        """The backbone's feature vectors from the frozen blocks' output ``x`` (see ``_frozen_bottom``)."""
        tf = self.tf
        if self.colour:
            return tf.concat([self._network_features(x[:-1]), tf.cast(x[-1], tf.float32)], axis=1)
        return self._network_features(x)

    def _network_features(self, x):
        tf = self.tf
        if len(x) == 1:
            return self.net.top(x[0], self.k, self.dtype)
        from mltag.backbones.builtin import MID_WEIGHT

        (f1, m1), (f2, m2) = self.net.top_levels(x[0], self.k, self.dtype), self.net.top_levels(x[1], self.k, self.dtype)
        tuned = [MID_WEIGHT * 0.5 * (a + b) for a, b in zip(m1, m2)]
        return tf.concat([0.5 * (f1 + f2), tf.cast(x[2], tf.float32)] + tuned, axis=1)

    def logits(self, x, training: bool, step=None):
        tf = self.tf
        h = self.features(x)  # float32, as the head's weights
        for i, (w, b) in enumerate(zip(self.kernels, self.biases)):
            if training and self.dropout > 0:  # the mask from (seed, layer, step): the same after a resume
                h = tf.nn.experimental.stateless_dropout(h, self.dropout, seed=tf.stack([self.seed + 7919 * i, step]))
            h = tf.matmul(h, w) + b
            if i < len(self.kernels) - 1:
                h = tf.nn.relu(h)
        return h

    def _step(self, x, y, step):
        tf = self.tf
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(y, self.logits(x, True, step)))
            scaled = loss * self.scale
        all_vars = self.tuned + self.head_vars
        grads = [tf.cast(g, tf.float32) / self.scale for g in tape.gradient(scaled, all_vars)]

        def apply_all():
            for o, a, b in zip(self.opts, self.bounds[:-1], self.bounds[1:]):
                o.apply_gradients(zip(grads[a:b], all_vars[a:b]))

        if not self.half:
            apply_all()
            return loss
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])

        def apply():
            apply_all()
            return tf.constant(True)

        def back_off():  # dynamic loss scaling: skip the step and halve the scale on overflow
            self.scale.assign(tf.maximum(self.scale / 2.0, 1.0))
            return tf.constant(False)

        tf.cond(finite, apply, back_off)
        return loss

    def val_logits(self, x):
        n = len(x[0])
        return np.concatenate([self.logit_fn(self._const(_take(x, slice(i, i + 64)))).numpy() for i in range(0, n, 64)])

    def _const(self, x: tuple) -> tuple:
        return tuple(self.tf.constant(a) for a in x)

    def _state(self, epoch: int, done: bool, history: dict, stopper, rng, best_weights) -> tuple[dict, dict]:
        meta = {"epoch": epoch, "done": done, "history": history, "rng": rng.bit_generator.state,
                "stopper": [stopper.best, stopper.since, stopper.best_epoch]}
        arrays = {f"var{i}": v.numpy() for i, v in enumerate(self.tuned + self.head_vars)}
        for j, o in enumerate(self.opts):
            arrays.update({f"opt{j}_{i}": v.numpy() for i, v in enumerate(o.variables)})
        arrays["scale"] = self.scale.numpy()
        if best_weights is not None:
            arrays.update({f"best{i}": w for i, w in enumerate(best_weights)})
        return meta, arrays

    def _restore(self, arrays: dict, stopper, rng, meta: dict):
        """The weights, optimizer slots, loss scale, generator and early stopping a checkpoint holds; its best
        weights (None before the first better epoch)."""
        for i, v in enumerate(self.tuned + self.head_vars):
            v.assign(arrays[f"var{i}"])
        for j, o in enumerate(self.opts):
            for i, v in enumerate(o.variables):
                v.assign(arrays[f"opt{j}_{i}"])
        self.scale.assign(arrays["scale"])
        rng.bit_generator.state = meta["rng"]
        stopper.best, stopper.since, stopper.best_epoch = meta["stopper"]
        n = len(self.tuned + self.head_vars)
        return [arrays[f"best{i}"] for i in range(n)] if "best0" in arrays else None

    def fit(self, x_tr, y_fit, x_va, y_va, train: config.Train, rng, progress: bool, ckpt=None, state=None) -> dict:
        """The epochs, stopped early as the head's fit stops; the best epoch's weights restored. With ``ckpt``,
        each epoch's state is saved there; with ``state`` (what it held), the epochs resume after its last one."""
        from tqdm import tqdm

        from mltag.head.fit import EarlyStopping, validation_metrics

        tf, epochs, batch_size = self.tf, train.fine_tune_epochs, train.batch_size
        history: dict[str, list[float]] = {"loss": [], "val_loss": [], "val_map": []}
        # the head's fit and this phase pick their best epoch the same way; without validation, the train loss
        has_val = y_va is not None and len(y_va) > 0
        mon = train.monitor if has_val else "loss"
        stopper = EarlyStopping(mon, train.fine_tune_patience if has_val else 0)
        best_weights, start, done = None, 0, False
        if state is not None:
            meta, arrays = state
            best_weights = self._restore(arrays, stopper, rng, meta)
            history, start, done = meta["history"], int(meta["epoch"]), bool(meta["done"])
            log.info("fine-tune: resuming after epoch %d/%d from its checkpoint %s%s", start, epochs, ckpt,
                     " (finished)" if done else "")
        n_rows = len(y_fit) if y_fit is not None else 0
        bar = tqdm(total=(epochs - start) * n_rows, desc=f"fine-tune: blocks {self.k}-{self.net.n_blocks - 1} + head",
                   unit="img", leave=False, disable=not progress or done)
        t1 = time.perf_counter()
        for epoch in range(start, epochs if not done else start):
            bar.set_postfix(epoch=f"{epoch + 1}/{epochs}")
            order = rng.permutation(n_rows)
            losses = []
            for n, i in enumerate(range(0, len(order), batch_size)):
                idx = order[i: i + batch_size]
                step = epoch * self.steps_per_epoch + n
                if self.schedule is not None:
                    factor = self.schedule(step)
                    for o, base in zip(self.opts, self.base_rates):
                        o.learning_rate = base * factor  # the optimizer's variable: the traced step reads it
                losses.append(float(self.step(self._const(_take(x_tr, idx)), tf.constant(y_fit[idx]),
                                              tf.constant(step, tf.int64))) * len(idx))
                bar.update(len(idx))
                if n == 0:
                    fault_point(f"fine-tune:epoch{epoch + 1}")  # the fault suite's kill, mid-epoch
            history["loss"].append(float(np.sum(losses) / n_rows))
            if x_va is not None:
                val_loss, val_map = validation_metrics(self.val_logits(x_va), y_va)
                history["val_loss"].append(val_loss)
                history["val_map"].append(val_map)
            value = history[mon][-1]
            if not np.isfinite(history["loss"][-1]) or not np.isfinite(value):
                raise MltagError(f"fine-tune diverged at epoch {epoch + 1} (loss {history['loss'][-1]}); lower "
                                 "train.fine_tune_learning_rate")
            if stopper.update(value, epoch + 1):
                best_weights = [v.numpy() for v in self.tuned + self.head_vars]
            log.info("fine-tune: epoch %d/%d: loss %.4f%s (%.0f s)", epoch + 1, epochs, history["loss"][-1],
                     f", val loss {history['val_loss'][-1]:.4f}, val mAP {history['val_map'][-1]:.4f}"
                     if x_va is not None else "", time.perf_counter() - t1)
            last = stopper.stop or epoch + 1 == epochs
            if ckpt is not None:
                ckpt.save(*self._state(epoch + 1, last, history, stopper, rng, best_weights))
            if stopper.stop:
                break
        bar.close()
        for v, w in zip(self.tuned + self.head_vars, best_weights):
            v.assign(w)
        history["best_epoch"] = stopper.best_epoch
        history["resumed_after"] = start
        return history
