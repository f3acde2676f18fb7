"""register: log the model to MLflow, register a version, alias it ``challenger``, gate ``champion``.

The gate re-scores the current champion on the current test split (never trusting old
tags) and promotes the challenger only when its test mAP beats the champion's by more
than ``margin`` and no label's AP drops by more than ``max_label_ap_drop``.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import io
import json
import logging
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from mltag import config
from mltag import metrics as M
from mltag.config import derived_model_name
from mltag.data.formats import (
    INTEGRITY_FILE,
    dataset_source,
    image_root_of,
    load_hashes,
    load_prepared,
    read_model_meta,
    read_thresholds,
    verify_integrity,
)
from mltag.errors import MltagError
from mltag.files import fault_point, process_token, remove_stale_leftovers, write_json_atomic
from mltag.inference.export import BACKBONE_DIR

log = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # mltag/: a registered version carries it as code

RUNTIME_PACKAGES = ("tensorflow", "tensorflow-hub", "ai-edge-litert", "pillow", "numpy", "pandas", "scikit-learn",
                    "mlflow")


def pip_requirements() -> list[str]:
    reqs = []
    for name in RUNTIME_PACKAGES:
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def _bundle(model_dir: Path, thresholds_file: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in (BACKBONE_DIR, "inference", "model.json", "labels.txt", "model.tflite", "head.npz", "head.keras",
                 INTEGRITY_FILE):
        src = model_dir / name
        if src.exists():
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / name)
    shutil.copy2(thresholds_file, dest / "thresholds.json")
    return dest


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

    from mltag.data.formats import read_thresholds, write_integrity
    from mltag.data.images import load_image
    from mltag.head.fit import load_head
    from mltag.inference.export import compose_tflite
    from mltag.inference.model import InferenceModel

    out: dict = {"images": min(limit, len(test_images))}
    if not (bundle / "model.tflite").is_file():
        return {"error": "no model.tflite in the model folder"}
    if not (bundle / BACKBONE_DIR).is_dir():
        return {"error": "a model folder from an older mltag (no backbone/); retrain it to register LiteRT files"}
    imgs = test_images[:limit]
    lite = InferenceModel(bundle / "model.tflite")
    fp32 = lite.scores(imgs)
    if evaluated:
        out["fp32_max_abs_diff_vs_evaluated"] = float(np.abs(fp32 - chall_scores[:limit]).max()) if len(imgs) else 0.0
    else:
        saved = InferenceModel(bundle, engine="tf").scores(imgs)
        out["fp32_max_abs_diff_vs_savedmodel"] = float(np.abs(fp32 - saved).max()) if len(imgs) else 0.0
    out["fp32_bytes"] = (bundle / "model.tflite").stat().st_size
    t, min_labels = M.decision_rule(read_thresholds(bundle / "thresholds.json"), labels)

    def quality(s):
        m = M.compute(y_test, s, t, labels, min_labels) if len(y_test) else {"map": None, "micro_f1": None}
        return m["map"], m["micro_f1"]

    out["fp32_test_map"], out["fp32_test_micro_f1"] = quality(chall_scores)
    kinds = {"full": ("int8", "dynamic_range"), "dynamic_range": ("dynamic_range",), "none": ()}[int8]
    rep = None
    if "int8" in kinds:
        rep = representative if representative is not None else \
            [load_image(p, lite.image_size) for p in train_images[:int8_images]]
        out["int8_calibration_images"] = len(rep)
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
    out["int8_kind"] = chosen
    out["int8_shipped"] = chosen is not None
    if chosen is None:
        (bundle / "model_int8.tflite").unlink(missing_ok=True)
    out["int8_reason"] = _int8_reason(out, bool(kinds), chosen, max_drop)
    if chosen is not None:
        out["shipped_bytes"] = out[f"{chosen}_bytes"]
    write_integrity(bundle)  # the bundle's content now includes (or not) model_int8.tflite
    return out


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
        return "not tried (register.int8: none)"
    tried_kinds = ", ".join(f"{k}: mAP {out.get(f'{k}_test_map', float('nan')):.4f}, micro F1 "
                            f"{out.get(f'{k}_test_micro_f1', float('nan')):.4f}"
                            for k in ("int8", "dynamic_range") if f"{k}_test_map" in out and out[f"{k}_test_map"] is not None)
    return (f"not shipped: no quantized model stays within {max_drop} of fp32 (mAP {out['fp32_test_map']:.4f}, "
            f"micro F1 {out['fp32_test_micro_f1']:.4f}); {tried_kinds or 'both conversions failed'}")


EVALUATED_TOLERANCE = 2e-3  # model.tflite against evaluate's scores: cached vectors are float16 (5e-4 seen)


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
        return litert_backbone(_folder_backbone(bundle, meta), size, "", kind="dynamic_range"), True
    lite = scratch / f"{kind}.backbone.tflite"
    with quiet_stderr():
        convert_backbone(str(bundle / BACKBONE_DIR), size, lite, dynamic_range=kind == "dynamic_range",
                         representative=representative if kind == "int8" else None)
    return lite, False


def _folder_backbone(folder: Path, meta: dict):
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
    from mltag.files import atomic_path, lock_file_for, locked
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
        with locked(lock_file_for(f"{memo}.update"), f"the feature memo {memo}"):
            merged = {**read(), **new}
            with atomic_path(memo) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, sha=np.array(list(merged)), features=np.stack(list(merged.values())))
        known = {**known, **merged}
    if any(h not in known for h in hashes):  # a non-finite feature: run those images, never store them
        return _scores_in_chunks(LiteRTEngine(backbone_file), images, image_size)
    return np.stack([known[h] for h in hashes]).astype(np.float32)


def _score_pyfunc(model, images: list[Path], labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A registered pyfunc's scores of ``images`` and the labels it chose (at its own thresholds), as 0/1."""
    import pandas as pd

    cols = [f"score_{lb}" for lb in labels]
    out, chosen = [], []
    for at in range(0, len(images), MEMO_CHUNK):  # base64 of every test image at once grows with the data
        df = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in images[at: at + MEMO_CHUNK]]})
        res = model.predict(df)
        missing = [c for c in cols if c not in res.columns]
        if missing:
            raise MltagError(f"champion does not score the same labels (missing {', '.join(missing)})")
        out.append(res[cols].to_numpy(np.float64))
        chosen += [set(str(v).split(",")) if v else set() for v in res["labels"]]
    pred = np.array([[lb in c for lb in labels] for c in chosen], dtype=int).reshape(len(chosen), len(labels))
    return (np.concatenate(out) if out else np.zeros((0, len(labels)))), pred


def model_hash(model_dir: Path, thresholds: Path) -> str:
    """SHA-256 over the model folder's files (names and bytes) and the thresholds: the version's identity."""
    import hashlib

    from mltag.files import sha256_file

    h = hashlib.sha256()
    for f in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        if f.name in ("run.json", "config.json", "summary.json"):
            continue  # run bookkeeping, not the model
        h.update(f"{f.relative_to(model_dir).as_posix()}:{sha256_file(f)}\n".encode())
    h.update(f"thresholds:{sha256_file(thresholds)}".encode())
    return h.hexdigest()


def _registry_error(e: Exception, what: str) -> MltagError:
    """A registry read that failed for any reason but "does not exist": one line naming the store, never absent."""
    from mltag.tracking import runs as tracking

    uri = tracking.tracking_uri()
    first = tracking.scrub(str(e).splitlines()[0][:300] if str(e) else type(e).__name__, uri)
    return MltagError(f"the MLflow registry at {tracking.mask_uri(uri)} failed to answer {what} ({first}); nothing was "
                      "registered and no alias moved. Rerun register once the server answers")


def _absent(e: Exception) -> bool:
    """Whether an MLflow error means "there is no such thing" (and only that)."""
    return getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _version_with_hash(client, model_name: str, content: str):
    """The oldest version of ``model_name`` with this content hash, or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{model_name}'")
    except MlflowException as e:
        if _absent(e):
            return None
        raise _registry_error(e, f"the search for versions of {model_name!r}") from None
    found = [v for v in versions if (v.tags or {}).get("mltag.content_hash") == content]
    return min(found, key=lambda v: int(v.version)) if found else None


def _alias(client, model_name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as e:
        # MLflow answers an alias nobody set with INVALID_PARAMETER_VALUE, "Registered model alias X not found."
        if _absent(e) or getattr(e, "error_code", None) == "INVALID_PARAMETER_VALUE" and \
                f"alias {alias} not found" in str(e):
            return None
        raise _registry_error(e, f"which version of {model_name!r} is {alias!r}") from None


def gate(challenger_ap: np.ndarray, champion_ap: np.ndarray, labels: list[str], margin: float,
         max_label_ap_drop: float) -> tuple[bool, str]:
    """Decide promotion from per-label APs on the same test split; return (promote, reason)."""
    ch, cp = float(np.nanmean(challenger_ap)), float(np.nanmean(champion_ap))
    drops = {n: float(b - a) for n, a, b in zip(labels, challenger_ap, champion_ap) if np.isfinite(a) and np.isfinite(b)}
    worst = max(drops, key=drops.get) if drops else None
    if worst is not None and drops[worst] > max_label_ap_drop:
        return False, (f"label {worst!r} AP drops {drops[worst]:.4f} (> max_label_ap_drop {max_label_ap_drop}) "
                       f"vs the champion")
    if ch <= cp + margin:
        return False, f"test mAP {ch:.4f} does not beat the champion's {cp:.4f} by more than margin {margin}"
    return True, f"test mAP {ch:.4f} beats the champion's {cp:.4f} by more than margin {margin}"


def _scores_from_vectors(meta: dict, backbone_id, image_size) -> bool:
    """Whether a model (its model.json) scores vectors of this backbone and size with its head alone:
    a head-mode model on that very backbone and size."""
    return meta.get("mode", "head") == "head" and meta.get("backbone_id") == backbone_id \
        and int(meta.get("image_size", 0)) == int(image_size)


def _cached_test_vectors(bottlenecks, meta: dict, test_paths: list[str]) -> np.ndarray | None:
    """The test split's cached vectors, when they are what the model's own backbone gives (head mode,
    the same backbone and size; ``meta``: its model.json) and list the same images as the prepared
    test split; else None."""
    from mltag.data.formats import load_split, read_bottleneck_meta

    bmeta = read_bottleneck_meta(bottlenecks)
    if not _scores_from_vectors(meta, bmeta["backbone_id"], bmeta["image_size"]):
        return None
    x, _, paths = load_split(bottlenecks, "test")
    if [str(p) for p in paths] != [str(p) for p in test_paths]:
        log.info("register: the bottlenecks' test split differs from the prepared one; scoring the images")
        return None
    return x


def _champion_head_scores(client, model_name: str, version, meta: dict, labels: list[str], cached: np.ndarray,
                          scratch: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The champion's scores from its own head on the cached test vectors, and the labels it chooses at its
    own thresholds, when it is a head-mode model on the same backbone and size (the vectors are exactly what
    its backbone gives); else None. Only its ``model.json``, ``head.npz`` and thresholds are downloaded."""
    import mlflow

    from mltag.data.formats import read_handoff
    from mltag.head.fit import load_head

    try:
        source = client.get_model_version_download_uri(model_name, str(version))
        folder = scratch / "champion"
        folder.mkdir()
        for name in ("model.json", "head.npz", "thresholds.json"):
            mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/artifacts/model/{name}",
                                                dst_path=str(folder))
    except Exception as e:  # noqa: BLE001 - an older champion's layout, or a store that cannot: score its images
        log.debug("register: champion head not downloadable (%s); scoring its images", e)
        return None
    champ = read_handoff(folder / "model.json", "the champion's model.json", "train")
    if not _scores_from_vectors(champ, meta.get("backbone_id"), meta["image_size"]) or champ.get("labels") != labels:
        return None
    head = load_head(folder, labels)
    if head is None:
        return None
    scores = head.predict(cached)
    t, min_labels = M.decision_rule(read_thresholds(folder / "thresholds.json", labels), labels)
    return scores, M.decide(scores, t, min_labels)


SCRATCH = "mltag-register"


def _check_challenger(model_dir: Path, thresholds: Path, tmp: Path, meta: dict, bottlenecks, test, test_images,
                      y_test: np.ndarray, labels: list[str], prepared, root: Path, register: config.Register,
                      test_hashes) -> tuple[Path, np.ndarray | None, np.ndarray, dict | None]:
    """What register decides on, without MLflow: the bundle (model folder + thresholds) in ``tmp``, the
    challenger's test scores (the cached vectors' when they match, as evaluate scored them; else from
    the images) and, with ``register.tflite``, the LiteRT parity table (raising when model.tflite
    differs from what was evaluated)."""
    bundle = _bundle(model_dir, thresholds, tmp / "model")
    cached = _cached_test_vectors(bottlenecks, meta, [ex.path for ex in test]) if bottlenecks else None
    if cached is not None:  # the scores evaluate measured: the head on the test images' cached vectors
        from mltag.head.fit import head_scores

        chall_scores = head_scores(bundle, cached)
    else:
        from mltag.inference.model import InferenceModel

        chall_scores = InferenceModel(bundle).scores(test_images) if test_images else np.zeros((0, len(labels)))
    parity = None
    if register.tflite:
        _, train_ex = load_prepared(prepared, "train")
        parity = tflite_parity(bundle, test_images, y_test, labels, [root / ex.path for ex in train_ex],
                               chall_scores, int8=register.int8, int8_images=register.int8_images,
                               max_drop=register.int8_max_drop, evaluated=cached is not None,
                               test_hashes=test_hashes)
        write_json_atomic(bundle / "tflite_parity.json", parity)
        for key, tol, what in (("fp32_max_abs_diff_vs_savedmodel", 1e-4, "the SavedModel"),
                               ("fp32_max_abs_diff_vs_evaluated", EVALUATED_TOLERANCE, "the evaluated scores")):
            if parity.get(key, 0.0) > tol:
                raise MltagError(f"model.tflite differs from {what} by {parity[key]:.2e} (> {tol}); "
                                 "not registering", model_dir / "model.tflite")
    return bundle, cached, chall_scores, parity


def _scratch(out: Path) -> Path:
    """register's scratch folder, beside ``out``: writing there proves ``out`` writable before the
    registry is touched, and what a killed register left there is removed (once its process is gone)."""
    if out.is_dir():
        raise MltagError("--out is a folder; give a file name for register's decision (JSON)", out)
    if out.exists() and not os.access(out, os.W_OK):
        raise MltagError("--out is not writable; nothing was registered", out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_leftovers(out.parent, SCRATCH)
        return Path(tempfile.mkdtemp(prefix=f".{SCRATCH}.{process_token()}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise MltagError(f"cannot write register's output here ({e.strerror or e}); nothing was registered",
                         out.parent) from None


def _check_recorded_digest(client, model_dir: Path, digest: str) -> None:
    """The folder's content hash must be the one train tagged its run with, when that run is in this store."""
    from mltag.tracking import runs as tracking

    ref = tracking.run_ref_of(model_dir)
    if not ref or not tracking._run_exists(client, ref["run_id"]):
        return
    recorded = client.get_run(ref["run_id"]).data.tags.get(tracking.MODEL_DIGEST_TAG)
    if recorded and recorded != digest:
        raise MltagError(f"this model folder's content hash differs from the one train recorded in MLflow run "
                         f"{ref['run_id']} ({recorded[:12]}...): the folder was changed after training; not "
                         "registering", model_dir)


def register(model_dir: str | os.PathLike, thresholds: str | os.PathLike, prepared: str | os.PathLike,
             out: str | os.PathLike, *, register: config.Register, tracking: config.Tracking,
             images: str | os.PathLike | None = None, tracking_uri: str | None = None, run_id: str | None = None,
             config: dict | None = None, bottlenecks: str | os.PathLike | None = None,
             card: str | os.PathLike | None = None, metrics_file: str | os.PathLike | None = None) -> dict:
    """Log, register and (maybe) promote the model; write the decision to ``out``, its headline figures to
    ``metrics_file`` (the version, whether it was promoted, both test mAPs) when given, and the version's model
    card (logged with its run) to ``card`` (Markdown, and HTML beside it) when given.

    With ``bottlenecks`` (the folder the model was trained on), a model that uses its backbone
    as it is (head mode) is scored on the test split from the cached vectors, as evaluate
    scored it, and so is a champion with the same backbone (its own head on the same
    vectors); otherwise both are scored end to end from the images.

    ``register`` and ``tracking`` are the typed params sections. With ``register.tflite`` the registered version also carries ``model.tflite`` (fp32) and
    ``model_int8.tflite`` with ``tflite_parity.json`` (fp32 vs SavedModel, int8 vs fp32).
    """
    model_name = register.model_name or derived_model_name(dataset_source(prepared))
    register = register.model_copy(update={"model_name": model_name})
    tflite = register.tflite
    experiment = tracking.experiment or derived_model_name(dataset_source(prepared))  # as train names it
    model_dir, thresholds, out = Path(model_dir), Path(thresholds), Path(out)
    digest = verify_integrity(model_dir)  # a hand-edited model folder never reaches the registry
    meta = read_model_meta(model_dir, verify=False)
    model_labels = meta["labels"]
    read_thresholds(thresholds, model_labels)
    labels, test, root, test_images, y_test, test_hashes = _test_split(prepared, images)
    tmp = _scratch(out)  # also proves --out's folder writable, before the registry is touched
    try:
        bundle, cached, chall_scores, parity = _check_challenger(
            model_dir, thresholds, tmp, meta, bottlenecks, test, test_images, y_test, labels, prepared, root,
            register, test_hashes)
        import mlflow
        from mlflow import MlflowClient

        from mltag.tracking import runs as mltracking

        uri = mltracking.setup_checked(tracking_uri)
        client = MlflowClient()
        run_id = mltracking.model_run(model_dir, run_id, uri)
        _check_recorded_digest(client, model_dir, digest)
        if labels != model_labels:  # after the digest: an edited folder is reported as edited
            raise MltagError(f"the model scores labels {model_labels} but the prepared data has {labels}; train "
                             "on this data (or register against the data it was trained on)",
                             model_dir / "model.json")
        if run_id is None:
            mlflow.set_experiment(experiment)
        chall_ap = M.average_precisions(y_test, chall_scores)
        # 1. Decide before touching the registry: a failure here leaves no version behind.
        chall_map = float(np.nanmean(chall_ap))
        content = model_hash(model_dir, thresholds)
        existing = _version_with_hash(client, model_name, content)
        champ = _alias(client, model_name, "champion")
        result = {"model_name": model_name, "challenger_test_map": chall_map, "tracking_uri": mltracking.mask_uri(uri),
                  "champion_version": None, "champion_test_map": None, "content_hash": content,
                  "scored_from": "cached vectors" if cached is not None else "images", "champion_scored_from": None}
        th, min_labels = M.decision_rule(read_thresholds(thresholds, labels), labels)
        chall = (chall_scores, M.decide(chall_scores, th, min_labels))
        promote, reason = _decide(client, register, champ, existing, chall, y_test, meta, labels, cached,
                                  test_images, tmp, result)
        tags = {"mltag.content_hash": content, "mltag.test_map": f"{chall_map:.6f}", "mltag.labels": ",".join(labels),
                "mltag.gate": ("promoted: " if promote else "kept: ") + reason}
        if tflite:
            tags["mltag.int8"] = str(parity.get("int8_reason") or parity.get("error", ""))[:500]
        fault_point("register:decided")
        result["gate_passed"] = promote
        dvc_exp = os.environ.get("DVC_EXP_NAME") if register.experiments == "decide" else None
        with mlflow.start_run(run_id=run_id) as run:
            result["run_id"] = run.info.run_id
            if dvc_exp:  # an exploratory `dvc exp run`: the decision, and nothing in the registry
                reason = (f"DVC experiment {dvc_exp}: not registered (register.experiments: decide); the gate "
                          f"{'would promote' if promote else 'would keep'} it: {reason}")
                result.update({"version": None, "promoted": False, "reason": reason, "aliases": []})
                if tflite:
                    result["tflite"] = parity
                mlflow.set_tag("mltag.gate", reason[:5000])
                mlflow.log_metrics({"gate_passed": float(promote)})
                _model_card(client, result, meta, prepared, labels, y_test, chall_scores, thresholds,
                            parity if tflite else None, register, card)
                return _finish(result, config, out, metrics_file, False, reason)
            signature, example = _signature(bundle, test_images)
            mv = _version(client, model_name, existing, tags, bundle, signature, example)
            promote, reason = _move_aliases(client, model_name, mv, champ, promote, reason)
            mlflow.log_metrics({"registered_test_map": chall_map})
            if tflite and "fp32_bytes" in parity:
                mlflow.log_metrics({f"tflite_{k}": v for k, v in parity.items()
                                    if isinstance(v, float) and k != "images"})
            mlflow.set_tag("mltag.registered_version", mv)
            if config:
                mlflow.log_dict(config, "register/config.json")
            if tflite:
                result["tflite"] = parity
            result.update({"version": int(mv), "promoted": promote, "reason": reason,
                           "aliases": ["challenger", "champion"] if promote else ["challenger"]})
            _model_card(client, result, meta, prepared, labels, y_test, chall_scores, thresholds,
                        parity if tflite else None, register, card)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _finish(result, config, out, metrics_file, promote, reason)


def _finish(result: dict, config: dict | None, out: Path, metrics_file, promote: bool, reason: str) -> dict:
    """The decision written to ``out`` whole, and its headline to ``metrics_file`` (what ``dvc exp show`` shows)."""
    result["config"] = config
    write_json_atomic(out, result)
    if metrics_file is not None:
        write_json_atomic(metrics_file, {"version": result["version"], "gate_passed": int(result["gate_passed"]),
                                         "promoted": int(result["promoted"]),
                                         "challenger_test_map": result["challenger_test_map"],
                                         "champion_test_map": result["champion_test_map"]})
    verdict = "promoted to champion" if promote else "kept as challenger"
    log.debug("register: %s version %s %s: %s", result["model_name"], result["version"], verdict, reason)
    return result


def _test_split(prepared, images):
    """The test split: labels, examples, image root, image paths, the 0/1 matrix, and each image's
    SHA-256 as prepare recorded it (None when some are missing)."""
    labels, test = load_prepared(prepared, "test")
    root = Path(images) if images else image_root_of(prepared)
    test_images = [root / ex.path for ex in test]
    y_test = np.array([ex.flags for ex in test], dtype=int).reshape(len(test), len(labels))
    known = load_hashes(prepared) or {}
    test_hashes = [known.get(ex.path) for ex in test]
    return labels, test, root, test_images, y_test, test_hashes if all(test_hashes) else None


def _signature(bundle: Path, test_images: list[Path]):
    """The version's signature and input example: one test image as base64, and what the model returns."""
    import pandas as pd
    from mlflow.models import infer_signature

    from mltag.inference.model import InferenceModel
    from mltag.registry.pyfunc import MltagPyfunc

    if not test_images:
        return None, None
    example = pd.DataFrame({"image": [base64.b64encode(test_images[0].read_bytes()).decode()]})
    py = MltagPyfunc()
    py.model = InferenceModel(bundle)
    return infer_signature(example, py.predict(None, example), params={"tta": "none"}), example


def _model_card(client, result: dict, meta: dict, prepared, labels: list[str], y_test: np.ndarray,
                scores: np.ndarray, thresholds: Path, parity: dict | None, register: config.Register, card) -> None:
    """The version's model card: logged with its run (``model_card/``), its decision as the version's
    description, and written to ``card`` when given."""
    import mlflow

    from mltag.data.formats import read_handoff
    from mltag.registry.card import card_sections, to_html, to_markdown, write_card

    splits = {s: load_prepared(prepared, s)[1] for s in ("train", "val", "test")}
    counts = {lb: {s: int(sum(ex.flags[j] for ex in exs)) for s, exs in splits.items()} for j, lb in enumerate(labels)}
    sections = card_sections(
        model_name=result["model_name"], version=result["version"], run_id=result.get("run_id"),
        content_hash=result["content_hash"], meta=meta,
        dataset=read_handoff(Path(prepared) / "dataset.json", "dataset.json", "prepare"),
        split_sizes={s: len(exs) for s, exs in splits.items()}, label_counts=counts, labels=labels, y_test=y_test,
        scores=scores, thresholds=read_thresholds(thresholds, labels), parity=parity, decision=result,
        bootstrap=register.bootstrap)
    title = f"Model card: {result['model_name']} " + (f"version {result['version']}" if result["version"] is not None
                                                      else "(not registered: a DVC experiment)")
    mlflow.log_text(to_markdown(title, sections), "model_card/model_card.md")
    mlflow.log_text(to_html(title, sections), "model_card/model_card.html")
    if result["version"] is not None:
        client.update_model_version(result["model_name"], str(result["version"]),
                                        description=f"{'Promoted' if result['promoted'] else 'Kept'}: {result['reason']}. "
                                                "Model card: the run's model_card/model_card.md")
    if card:
        write_card(card, title, sections)


def _decide(client, register: config.Register, champ, existing, chall: tuple, y_test: np.ndarray,
            meta: dict, labels: list[str], cached, test_images: list[Path], tmp: Path, result: dict) -> tuple[bool, str]:
    """The gate: whether the challenger replaces the champion, and why, in one sentence. ``chall`` is the
    challenger's scores and 0/1 decisions on the test images. The champion is scored on the same images:
    from the cached vectors when it shares the challenger's backbone, else end to end through its
    registered pyfunc. Records the champion's figures and the comparison in ``result``."""
    import mlflow

    model_name = register.model_name
    if champ is None:
        return True, "no champion yet"
    theirs = (champ.tags or {}).get("mltag.labels")
    if theirs is not None and theirs != ",".join(labels):
        raise MltagError(f"the champion of registered model {model_name!r} (version {champ.version}) scores other "
                         f"labels ({theirs.replace(',', ', ')}), not {', '.join(labels)}: a different label set is a "
                         "different model. Set register.model_name in params.yaml to a new name (or leave it empty to "
                         "name the model after the dataset's folder) and rerun: only register runs again")
    if existing is not None and str(champ.version) == str(existing.version):
        return True, "already the champion (same model content)"
    champion = _champion_head_scores(client, model_name, champ.version, meta, labels, cached,
                                     tmp) if cached is not None else None
    result["champion_scored_from"] = "cached vectors" if champion is not None else "images"
    if champion is None:
        try:
            champ_model = mlflow.pyfunc.load_model(f"models:/{model_name}/{champ.version}")
        except Exception as e:  # noqa: BLE001 - MLflow raises many kinds for files that are gone
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise MltagError(f"the champion of {model_name!r} (version {champ.version}, run {champ.run_id}) cannot be "
                             f"loaded to compare with: its artifacts are missing or unreadable ({first}); promote "
                             f"another version (mltag promote {model_name} VERSION) or delete the alias "
                             "'champion', then rerun register") from None
        champion = _score_pyfunc(champ_model, test_images, labels)
    champ_ap = M.average_precisions(y_test, champion[0])
    result["champion_version"] = int(champ.version)
    result["champion_test_map"] = float(np.nanmean(champ_ap))
    if register.gate == "point":
        return gate(M.average_precisions(y_test, chall[0]), champ_ap, labels, register.margin,
                    register.max_label_ap_drop)
    paired = M.paired_bootstrap(y_test, chall[0], champion[0], chall[1], champion[1], n=register.bootstrap,
                                level=register.confidence)
    result["comparison"] = {"rule": "paired", "confidence": register.confidence, "n_resamples": register.bootstrap,
                            "d_map": paired["map"], "d_micro_f1": paired["micro_f1"],
                            "d_ap": dict(zip(labels, paired["per_label"]))}
    return paired_gate(paired, labels, register.confidence, register.margin, register.max_label_ap_drop)


def _fmt(d: list[float] | None) -> str:
    return "n/a" if d is None else f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"


def paired_gate(paired: dict, labels: list[str], confidence: float, margin: float,
                max_label_ap_drop: float) -> tuple[bool, str]:
    """Promote when the challenger is better with ``confidence``: the lower end of ΔmAP's interval (a paired
    bootstrap on the same test images) is above ``margin``; and refuse when a label is worse by more than
    ``max_label_ap_drop`` with that confidence (the upper end of its ΔAP interval below ``-max_label_ap_drop``).
    A difference inside the noise promotes nothing. Returns ``(promote, the sentence that says why)``."""
    level = f"{confidence:.0%} confidence"
    worse = [(lb, d) for lb, d in zip(labels, paired["per_label"]) if d is not None and d[2] < -max_label_ap_drop]
    if worse:
        lb, d = min(worse, key=lambda x: x[1][0])
        return False, (f"label {lb!r} AP {_fmt(d)}: worse by more than max_label_ap_drop {max_label_ap_drop} "
                       f"with {level}")
    figures = f"ΔmAP {_fmt(paired['map'])}" + (f", Δmicro F1 {_fmt(paired['micro_f1'])}" if paired["micro_f1"] else "")
    if paired["map"] is None or paired["map"][1] <= margin:
        return False, f"{figures}: not better" + (f" by more than margin {margin}" if margin else "") + f" with {level}"
    return True, f"{figures}: better" + (f" by more than margin {margin}" if margin else "") + f" with {level}"


def _version(client, model_name: str, existing, tags: dict, bundle: Path, signature, example) -> str:
    """The registered version of this model content: a new one (logged in the active run, its tags set in
    the same call), or the one a crashed or repeated register made already."""
    import mlflow

    if existing is not None:  # one version per model content
        mv = str(existing.version)
        for k, v in tags.items():
            client.set_model_version_tag(model_name, mv, k, v)
        log.info("register: this model content is already version %s; reusing it", mv)
        fault_point("register:created")
        return mv
    info = mlflow.pyfunc.log_model(
        name="model", python_model=str(PACKAGE_DIR / "registry" / "pyfunc_model.py"),
        artifacts={"model": str(bundle)},
        code_paths=[str(PACKAGE_DIR)], signature=signature, input_example=example,
        pip_requirements=pip_requirements())
    fault_point("register:logged")
    with contextlib.redirect_stderr(io.StringIO()):  # MLflow's "Successfully registered..." lines
        mv = str(mlflow.register_model(info.model_uri, model_name, tags=tags).version)
    fault_point("register:created")
    return _keep_oldest(client, model_name, mv, tags["mltag.content_hash"])


def _keep_oldest(client, model_name: str, mv: str, content: str) -> str:
    """One version per model content, whatever raced: two registers of one folder at once, or a create that
    MLflow's client retried after it had succeeded. The oldest version with this content is kept; ``mv``,
    when newer, is deleted. Every racer keeps the same one and deletes only its own."""
    oldest = _version_with_hash(client, model_name, content)
    if oldest is None or str(oldest.version) == mv:
        return mv
    try:
        client.delete_model_version(model_name, mv)
    except Exception as e:  # noqa: BLE001 - said, and marked, below: the oldest is the one used either way
        log.warning("register: version %s duplicates version %s (same content) and could not be deleted (%s)",
                    mv, oldest.version, type(e).__name__)
        client.set_model_version_tag(model_name, mv, "mltag.duplicate_of", str(oldest.version))
    log.info("register: this model content is already version %s (made meanwhile); keeping it", oldest.version)
    return str(oldest.version)


def _move_aliases(client, model_name: str, mv: str, champ, promote: bool, reason: str) -> tuple[bool, str]:
    """``challenger`` to ``mv``, then ``champion`` when promoted, only after the decision is recorded on the
    version. A champion that another register moved meanwhile is left where it is."""
    try:
        client.set_registered_model_alias(model_name, "challenger", mv)
        fault_point("register:challenger")
        if promote:
            now = _alias(client, model_name, "champion")
            now_v, scored_v = (str(now.version) if now else None), (str(champ.version) if champ else None)
            if now_v != scored_v and now_v != mv:
                reason = (f"the champion moved to version {now_v} while this register was comparing with "
                          f"version {scored_v}; rerun register to compare with it")
                client.set_model_version_tag(model_name, mv, "mltag.gate", f"kept: {reason}")
                return False, reason  # compare again next time
            client.set_registered_model_alias(model_name, "champion", mv)
            fault_point("register:champion")
    except Exception as e:
        client.set_model_version_tag(model_name, mv, "mltag.register_error", f"{type(e).__name__}: {e}"[:500])
        raise
    return promote, reason


def promote(model_name: str, version: int | str, reason: str, user: str | None = None,
            tracking_uri: str | None = None) -> dict:
    """Move ``champion`` to ``version`` by hand, recording who and why in tags."""
    from mlflow import MlflowClient

    from mltag.tracking import runs as tracking

    tracking.setup_checked(tracking_uri)
    client = MlflowClient()
    try:
        client.get_model_version(model_name, str(version))
    except Exception:  # noqa: BLE001
        raise MltagError(f"model {model_name!r} has no version {version}") from None
    user = user or os.environ.get("USER") or getpass.getuser()
    from mlflow.exceptions import MlflowException

    try:  # who and why first, the alias last: a failure leaves champion where it was
        client.set_model_version_tag(model_name, str(version), "mltag.promoted_by", user)
        client.set_model_version_tag(model_name, str(version), "mltag.promoted_reason", reason)
        client.set_model_version_tag(model_name, str(version), "mltag.gate", f"manual promotion by {user}: {reason}")
        client.set_registered_model_alias(model_name, "champion", str(version))
    except MlflowException as e:
        raise _registry_error(e, f"the promotion of {model_name!r} version {version}") from None
    result = {"model_name": model_name, "champion": int(version), "by": user, "reason": reason}
    log.info("promote: %s", json.dumps(result))
    return result
