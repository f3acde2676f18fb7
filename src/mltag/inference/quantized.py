"""The quantized model a registered version may carry, and the parity of its LiteRT files.

``tflite_parity`` checks ``model.tflite`` against what evaluate measured (or the SavedModel) and ships
``model_int8.tflite`` only when a quantized model keeps the test accuracy. A dynamic-range backbone of a
head-mode model is converted once per backbone and its features of each test image are kept beside it
(``memo_features``), so the next register on the same images scores the quantized model from them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from mltag import metrics as M
from mltag.data.formats import read_model_meta
from mltag.errors import MltagError
from mltag.inference.export import BACKBONE_DIR

log = logging.getLogger(__name__)


EVALUATED_TOLERANCE = 2e-3  # model.tflite against evaluate's scores: cached vectors are float16 (5e-4 seen)


def _calibration_images(kinds, representative, images: list[Path], size: int, out: dict):
    """Full int8's calibration images (``representative``, else ``images`` decoded as the model sees them), or None
    when full int8 is not tried."""
    if "int8" not in kinds:
        return None
    from mltag.data.images import load_image

    rep = representative if representative is not None else [load_image(p, size) for p in images]
    out["int8_calibration_images"] = len(rep)
    return rep


def tflite_parity(bundle: Path, test_images: list[Path], y_test: np.ndarray, labels: list[str],
                  train_images: list[Path], chall_scores: np.ndarray, limit: int = 32, *, int8: str,
                  int8_images: int, max_drop: float, representative: list[np.ndarray] | None = None,
                  evaluated: bool = False, test_hashes: list[str] | None = None) -> dict:
    """Check ``model.tflite``; ship a quantized model only if it keeps the accuracy.

    fp32: the largest score difference on (up to ``limit``) test images, a check of the file
    itself. With ``evaluated`` (``chall_scores`` are the scores evaluate measured, from the
    cached float16 vectors) against those, within ``EVALUATED_TOLERANCE`` (float16 rounding);
    else against the backbone SavedModel through TF and ``head.npz``, within 1e-4.
    Quantized (``int8``, ``register.int8``): ``full`` tries two kinds in turn, full int8 (the
    backbone's weights and activations, calibrated on up to ``int8_images`` training images
    decoded as the model sees them) then dynamic range (int8 weights, float activations; for a
    backbone used as it is, converted once per backbone and kept in the backbone cache);
    ``dynamic_range`` tries only the latter; ``none`` neither. The head stays float32. With
    ``test_hashes`` (the test images' SHA-256) a once-per-backbone quantized backbone's features
    of each test image are also kept (``memo_features``), so the next register on the same
    images and backbone scores the quantized model from them. The
    first whose test mAP and micro F1 (at the calibrated thresholds) stay within ``max_drop``
    of fp32 is added to the bundle as ``model_int8.tflite``; if neither does, none is, and the
    result says why. ``representative`` replaces the calibration images (a test's deliberately
    bad set).
    """
    import tempfile

    from mltag.data.formats import read_thresholds
    from mltag.data.integrity import write_integrity
    from mltag.head.saved import load_head
    from mltag.inference.export import compose_tflite
    from mltag.inference.model import InferenceModel

    out: dict = {"images": min(limit, len(test_images))}
    if not (bundle / "model.tflite").is_file():
        return {"error": "no model.tflite in the model folder"}
    if not (bundle / BACKBONE_DIR).is_dir():
        return {"error": "a model folder from an older mltag (no backbone/); retrain it to register LiteRT files"}
    lite = InferenceModel(bundle / "model.tflite")
    # backbone.precision int8: model.tflite is the int8 model the vectors came from; the SavedModel is float, so it is
    # checked against evaluate's scores only, and nothing is quantized on top of it
    int8_model = read_model_meta(bundle, verify=False).get("precision") == "int8"
    if int8_model:
        out["precision"], int8 = "int8", "none"
    if evaluated or not int8_model:
        out.update(_fp32_parity(bundle, lite, test_images[:limit], chall_scores[:limit], evaluated))
    t, min_labels, groups = M.decision_rule(read_thresholds(bundle / "thresholds.json"), labels)

    def quality(s):
        m = M.compute(y_test, s, t, labels, min_labels, groups) if len(y_test) else {"map": None, "micro_f1": None}
        return m["map"], m["micro_f1"]

    out["fp32_test_map"], out["fp32_test_micro_f1"] = quality(chall_scores)
    kinds = {"full": ("int8", "dynamic_range"), "dynamic_range": ("dynamic_range",), "none": ()}[int8]
    rep = _calibration_images(kinds, representative, train_images[:int8_images], lite.image_size, out)
    chosen = None
    head = load_head(bundle, labels)
    with tempfile.TemporaryDirectory(dir=bundle.parent) as scratch:
        for kind in kinds:
            f = Path(scratch) / f"{kind}.tflite"
            try:
                backbone_file, cached = _quantized_backbone(bundle, kind, rep, Path(scratch))
                compose_tflite(backbone_file, head.weights, f)
            except MltagError as e:
                out[f"{kind}_error"] = str(e)
                continue
            s = _quantized_scores(f, backbone_file, cached, head, bundle, kind, test_images, test_hashes,
                                  lite.image_size, len(labels), out)
            q_map, q_f1 = quality(s)
            out[f"{kind}_test_map"], out[f"{kind}_test_micro_f1"] = q_map, q_f1
            out[f"{kind}_max_abs_diff_vs_fp32"] = float(np.abs(s - chall_scores).max()) if len(s) else 0.0
            out[f"{kind}_bytes"] = f.stat().st_size
            drops = [a - b for a, b in ((out["fp32_test_map"], q_map), (out["fp32_test_micro_f1"], q_f1))
                     if a is not None and b is not None]
            if chosen is None and all(d <= max_drop for d in drops):
                chosen = kind
                os.replace(f, bundle / "model_int8.tflite")
    _settle(out, bundle, bool(kinds), chosen, max_drop)
    write_integrity(bundle)  # the bundle's content now includes (or not) model_int8.tflite
    return out


def _settle(out: dict, bundle: Path, tried: bool, chosen: str | None, max_drop: float) -> None:
    """Which quantized model ships (none: no ``model_int8.tflite`` left in the bundle), and why."""
    out["int8_kind"] = chosen
    out["int8_shipped"] = chosen is not None
    if chosen is None:
        (bundle / "model_int8.tflite").unlink(missing_ok=True)
    out["int8_reason"] = _int8_reason(out, tried, chosen, max_drop)
    if chosen is not None:
        out["shipped_bytes"] = out[f"{chosen}_bytes"]


def _fp32_parity(bundle: Path, lite, imgs: list[Path], evaluated_scores: np.ndarray, evaluated: bool) -> dict:
    """``model.tflite`` (``lite``) on ``imgs``: its largest difference from the scores evaluate measured
    (``evaluated``) or from the SavedModel through TF, and its size."""
    from mltag.inference.model import InferenceModel

    fp32 = lite.scores(imgs)
    if evaluated:
        key, other = "fp32_max_abs_diff_vs_evaluated", evaluated_scores
    else:
        key, other = "fp32_max_abs_diff_vs_savedmodel", InferenceModel(bundle, engine="tf").scores(imgs)
    return {key: float(np.abs(fp32 - other).max()) if len(imgs) else 0.0,
            "fp32_bytes": (bundle / "model.tflite").stat().st_size}


def _quantized_scores(f: Path, backbone_file: Path, cached: bool, head, bundle: Path, kind: str,
                      test_images: list[Path], test_hashes: list[str] | None, image_size: int, n_labels: int,
                      out: dict) -> np.ndarray:
    """The quantized model file ``f``'s scores of the test images. A once-per-backbone quantized backbone's
    features of each image are kept (``memo_features``), and the file must score what they give through
    the head; otherwise the file runs on the images, a chunk at a time."""
    from mltag.data.images import load_image
    from mltag.inference.engine import LiteRTEngine
    from mltag.workers import cpu_threads

    if not test_images:
        return np.zeros((0, n_labels), np.float32)
    if cached and test_hashes is not None:
        s = head.predict(memo_features(backbone_file, test_images, test_hashes, image_size))
        check = LiteRTEngine(f)(np.stack([load_image(p, image_size) for p in test_images[:4]]))
        out[f"{kind}_file_max_abs_diff"] = float(np.abs(check - s[:4]).max())
        if out[f"{kind}_file_max_abs_diff"] > 1e-4:
            raise MltagError(f"the {kind} model file differs from its backbone's features through the "
                             f"head by {out[f'{kind}_file_max_abs_diff']:.2e}; not registering", bundle)
        return s
    # one single-threaded interpreter per core: dynamic range's hybrid kernels scale badly across
    # one interpreter's threads (51 against 40 img/s, Lite2 on 2 cores)
    return _scores_in_chunks(LiteRTEngine(f, threads=1, parallel=cpu_threads()), test_images, image_size)


def _int8_reason(out: dict, tried: bool, chosen: str | None, max_drop: float) -> str:
    """One sentence: which quantized model ships, or why none does."""
    if chosen is not None:
        return (f"shipped {chosen}: test mAP {out[f'{chosen}_test_map']:.4f} and micro F1 "
                f"{out[f'{chosen}_test_micro_f1']:.4f} within {max_drop} of fp32")
    if not tried:
        return "not shipped: model.tflite is already int8 (backbone.precision int8)" if out.get("precision") == "int8" \
            else "not tried (register.int8: none)"
    tried_kinds = ", ".join(f"{k}: mAP {out.get(f'{k}_test_map', float('nan')):.4f}, micro F1 "
                            f"{out.get(f'{k}_test_micro_f1', float('nan')):.4f}"
                            for k in ("int8", "dynamic_range") if f"{k}_test_map" in out and out[f"{k}_test_map"] is not None)
    return (f"not shipped: no quantized model stays within {max_drop} of fp32 (mAP {out['fp32_test_map']:.4f}, "
            f"micro F1 {out['fp32_test_micro_f1']:.4f}); {tried_kinds or 'both conversions failed'}")


def _quantized_backbone(bundle: Path, kind: str, representative: list[np.ndarray] | None,
                        scratch: Path) -> tuple[Path, bool]:
    """The quantized backbone's ``.tflite`` and whether it is the once-per-backbone cached one: dynamic
    range of a backbone used as it is (head mode) is converted once and kept in the backbone cache;
    full int8 (calibrated on this data) and a fine-tuned backbone are converted here, each time."""
    from mltag.inference.engine import convert_backbone, litert_backbone
    from mltag.tf_runtime import quiet_stderr

    meta = read_model_meta(bundle, verify=False)
    size = int(meta["image_size"])
    if kind == "dynamic_range" and meta.get("mode", "head") == "head":
        return litert_backbone(folder_backbone(bundle, meta), size, "", kind="dynamic_range"), True
    lite = scratch / f"{kind}.backbone.tflite"
    with quiet_stderr():
        convert_backbone(str(bundle / BACKBONE_DIR), size, lite, dynamic_range=kind == "dynamic_range",
                         representative=representative if kind == "int8" else None)
    return lite, False


def folder_backbone(folder: Path, meta: dict):
    """A model folder's ``backbone/``, named as the backbone it is a copy of (what keys its conversions)."""
    from mltag.backbones.builtin import Backbone

    return Backbone(meta["backbone_handle"], str(folder / BACKBONE_DIR), meta["backbone_id"])


def _memo_file(backbone_file: Path) -> Path:
    """Where ``memo_features`` keeps a cached backbone file's features."""
    return backbone_file.with_name(backbone_file.name + ".features.npz")


MEMO_CHUNK = 256  # images decoded and run at once


def _scores_in_chunks(engine, images: list[Path], image_size: int) -> np.ndarray:
    """``engine`` over ``images``, ``MEMO_CHUNK`` decoded at a time: memory stays flat at any test size
    (100,000 images at 260 px would be 20 GB of pixels at once)."""
    from mltag.data.images import load_image
    from mltag.workers import imap_ordered

    out = [engine(np.stack(list(imap_ordered(lambda p: load_image(p, image_size), images[at: at + MEMO_CHUNK]))))
           for at in range(0, len(images), MEMO_CHUNK)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def memo_features(backbone_file: Path, images: list[Path], hashes: list[str], image_size: int) -> np.ndarray:
    """Features of ``images`` through a cached backbone ``.tflite``, kept beside it in
    ``<file>.features.npz`` keyed by image content (SHA-256), so each image runs once per backbone.

    A damaged memo is read as empty (and rewritten); the update holds a lock and merges what
    another process added meanwhile, and is written atomically."""
    from mltag.data.images import load_image
    from mltag.files import atomic_path, lock_beside, locked
    from mltag.inference.engine import LiteRTEngine
    from mltag.workers import cpu_threads, imap_ordered

    memo = _memo_file(backbone_file)

    def read() -> dict[str, np.ndarray]:
        try:
            with np.load(memo) as z:
                keys, values = z["sha"], z["features"]
            if values.ndim != 2 or len(keys) != len(values) or not np.isfinite(values).all():
                raise ValueError("damaged")
            return dict(zip(keys.tolist(), values))
        except FileNotFoundError:
            return {}
        except Exception as e:  # noqa: BLE001 - a damaged memo only costs its recomputation
            log.warning("register: %s is damaged (%s); computing its features again", memo, type(e).__name__)
            return {}

    known = read()
    missing = [i for i, h in enumerate(hashes) if h not in known]
    if missing:
        engine = LiteRTEngine(backbone_file, threads=1, parallel=cpu_threads())
        new = {}
        for at in range(0, len(missing), MEMO_CHUNK):
            idx = missing[at: at + MEMO_CHUNK]
            pixels = np.stack(list(imap_ordered(lambda i: load_image(images[i], image_size), idx)))
            for i, f in zip(idx, engine(pixels)):
                if np.isfinite(f).all():
                    new[hashes[i]] = f
        with locked(lock_beside(f"{memo}.update"), f"the feature memo {memo}"):
            merged = {**read(), **new}
            with atomic_path(memo) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, sha=np.array(list(merged)), features=np.stack(list(merged.values())))
        known = {**known, **merged}
    if any(h not in known for h in hashes):  # a non-finite feature: run those images, never store them
        return _scores_in_chunks(LiteRTEngine(backbone_file), images, image_size)
    return np.stack([known[h] for h in hashes]).astype(np.float32)
