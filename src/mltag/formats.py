"""The hand-offs between steps, in one place: readers of what prepare, bottleneck and train write.

Steps import these instead of importing each other, so a step's module holds only its
own work. Writers stay with the step that owns the format; the canonical ``.lst`` and
labels formats themselves live in ``mltag.common``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from mltag.common import Example, MltagError, read_labels, read_lst, sha256_file

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- damaged files


def read_json(path: str | os.PathLike, what: str, written_by: str = "") -> dict | list:
    """A hand-off JSON file, or a clear error naming it when it is missing, truncated or not JSON."""
    path = Path(path)
    hint = f"; run {written_by} again" if written_by else ""
    if not path.is_file():
        raise MltagError(f"{what} not found" + (f"; run {written_by} first" if written_by else ""), path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MltagError(f"{what} is damaged (not UTF-8 text){hint}", path) from None
    except json.JSONDecodeError as e:
        raise MltagError(f"{what} is damaged (invalid JSON: {e.msg}){hint}", path, e.lineno) from None


@contextlib.contextmanager
def open_npz(path: str | os.PathLike, what: str, written_by: str, keys: tuple[str, ...] = ()):
    """``np.load`` of a hand-off ``.npz``: a truncated, corrupt or incomplete file is a clear error naming it."""
    path = Path(path)
    if not path.is_file():
        raise MltagError(f"{what} not found; run {written_by} first", path)
    try:
        z = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        raise MltagError(f"{what} is damaged ({type(e).__name__}); run {written_by} again", path) from None
    with z:
        missing = [k for k in keys if k not in z.files]
        if missing:
            raise MltagError(f"{what} is damaged (no {', '.join(missing)}); run {written_by} again", path)
        try:
            yield z
        except (zipfile.BadZipFile, ValueError, EOFError, KeyError, OSError) as e:  # a member read past the damage
            raise MltagError(f"{what} is damaged ({type(e).__name__}); run {written_by} again", path) from None


def check_finite(values: np.ndarray, path: str | os.PathLike, what: str, fix: str) -> None:
    """Refuse NaN or infinite values: a model trained or scored on them is silently wrong."""
    if values.size == 0:  # an empty split (an empty validation split is allowed)
        return
    flat = values.reshape(len(values), -1) if values.ndim else values.reshape(1, -1)
    bad = 0
    for i in range(0, len(flat), 16384):  # in chunks: a mask of the whole array would double its memory
        chunk = flat[i: i + 16384]
        bad += int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
    if bad:
        raise MltagError(f"{bad} non-finite value(s) (NaN or inf) in the {what}; {fix}", path)


# --------------------------------------------------------------------------- prepare's output


def load_prepared(prepared: str | os.PathLike, split: str) -> tuple[list[str], list[Example]]:
    """Read labels and one split of a prepared dataset folder."""
    prepared = Path(prepared)
    labels = read_labels(prepared / "labels.txt")
    return labels, read_lst(prepared / f"{split}.lst", n_labels=len(labels))


def image_root_of(prepared: str | os.PathLike) -> Path:
    """The folder the prepared lists' image paths are relative to."""
    prepared = Path(prepared)
    f = prepared / "dataset.json"
    if not f.is_file():
        raise MltagError("not a prepared dataset folder (dataset.json missing); run prepare first", prepared)
    meta = read_json(f, "dataset.json", "prepare")
    if not isinstance(meta, dict) or not isinstance(meta.get("image_root"), str):
        raise MltagError("dataset.json is damaged (no image_root); run prepare again", f)
    return (prepared / meta["image_root"]).resolve()


HASHES_FILE = "hashes.tsv"


def write_hashes(path: str | os.PathLike, hashes: dict[str, tuple[str, int]]) -> None:
    """``sha256<TAB>bytes<TAB>path`` per image, sorted by path: prepare hashes each image once."""
    lines = [f"{sha}\t{size}\t{rel}\n" for rel, (sha, size) in sorted(hashes.items())]
    Path(path).write_text("".join(lines), encoding="utf-8")


def load_hashes(prepared: str | os.PathLike) -> dict[str, str] | None:
    """``{path: sha256}`` as prepare recorded it, or None for a folder prepared before hashes were kept."""
    f = Path(prepared) / HASHES_FILE
    if not f.is_file():
        return None
    out = {}
    for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split("\t", 2)
        if len(parts) != 3 or len(parts[0]) != 64:
            raise MltagError("expected 'sha256<TAB>bytes<TAB>path'", f, n)
        out[parts[2]] = parts[0]
    return out


# --------------------------------------------------------------------------- bottleneck's output


def load_split(bottlenecks: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(features, labels uint8, paths)`` for one split: the plain view only.

    The features stay as stored (float16): half the memory of float32, and every consumer casts
    a batch at a time (the cast is exact).
    """
    f = Path(bottlenecks) / f"{split}.npz"
    with open_npz(f, "bottleneck file", "the bottleneck step", ("features", "labels", "paths")) as z:
        x, y, p = z["features"], z["labels"], z["paths"]
    check_finite(x, f, f"{split} vectors", "rerun the bottleneck step (its cache never keeps such vectors)")
    return x, y, p


def load_views(bottlenecks: str | os.PathLike, split: str = "train") -> np.ndarray | None:
    """The augmented views ``[N, views - 1, D]`` of a split (as stored, float16), or None when there are none."""
    f = Path(bottlenecks) / f"{split}.npz"
    with open_npz(f, "bottleneck file", "the bottleneck step") as z:
        if "views" not in z.files:
            return None
        v = z["views"]
    check_finite(v, f, f"{split} augmented views", "rerun the bottleneck step")
    return v


def read_bottleneck_meta(bottlenecks: str | os.PathLike) -> dict:
    """``bottleneck.json``: which backbone, image size and preprocessing made the split vectors."""
    f = Path(bottlenecks) / "bottleneck.json"
    meta = read_json(f, "bottleneck output", "the bottleneck step")
    missing = [k for k in ("backbone_handle", "backbone_id", "image_size", "preprocessing")
               if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise MltagError(f"bottleneck.json is damaged (no {', '.join(missing)}); rerun the bottleneck step", f)
    return meta


# --------------------------------------------------------------------------- evaluate's output

SCORES_KEYS = ("val_scores", "val_labels", "val_paths", "test_scores", "test_labels", "test_paths")


def write_scores(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """evaluate's ``scores.npz``: val and test scores, labels and paths (for calibrate)."""
    np.savez(path, **{k: arrays[k] for k in SCORES_KEYS})


def load_scores(evaluation: str | os.PathLike) -> dict[str, np.ndarray]:
    """evaluate's ``scores.npz`` as a dict; damaged or non-finite scores are a clear error."""
    f = Path(evaluation) / "scores.npz"
    with open_npz(f, "scores", "the evaluate step", SCORES_KEYS) as z:
        out = {k: z[k] for k in SCORES_KEYS}
    for k in ("val_scores", "test_scores"):
        check_finite(out[k], f, k.replace("_", " "), "rerun the evaluate step")
    return out


# --------------------------------------------------------------------------- train's output


def model_mode(model_dir: str | os.PathLike) -> str:
    """``head`` or ``fine_tune``: how the model folder was trained (older folders: head)."""
    return read_model_meta(model_dir).get("mode", "head")


INTEGRITY_FILE = "integrity.json"
# What a model's identity covers: its label list and settings, and every weight file. Run
# bookkeeping (run.json, config.json, summary.json, history.json) is not the model.
_MODEL_CONTENT = ("model.json", "labels.txt", "head.keras", "model.tflite", "model_int8.tflite", "inference")


_SHA_SEEN: dict[tuple, str] = {}


def _sha_of(f: Path) -> str:
    """A file's SHA-256, hashed once per process for the same file, size and modification time
    (evaluate checks one model folder several times: the weights are read once, not each time)."""
    st = f.stat()
    key = (str(f.absolute()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SHA_SEEN:
        _SHA_SEEN[key] = sha256_file(f)
    return _SHA_SEEN[key]


def _content_files(model_dir: Path) -> dict[str, str]:
    out = {}
    for name in _MODEL_CONTENT:
        p = model_dir / name
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
        for f in files:
            out[f.relative_to(model_dir).as_posix()] = _sha_of(f)
    return out


def _digest(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def write_integrity(model_dir: str | os.PathLike) -> str:
    """Record the content hash of a model folder (its weights, model.json and labels.txt); returns the digest."""
    model_dir = Path(model_dir)
    files = _content_files(model_dir)
    digest = _digest(files)
    (model_dir / INTEGRITY_FILE).write_text(json.dumps({"format": 1, "algorithm": "sha256", "digest": digest,
                                                        "files": files}, indent=2) + "\n", encoding="utf-8")
    return digest


def verify_integrity(model_dir: str | os.PathLike) -> str:
    """Check a model folder against the content hash train recorded; returns the digest.

    A file edited, added to the model's content or removed since is an error naming it:
    a model whose label list no longer matches its weights must never be served.
    """
    model_dir = Path(model_dir)
    f = model_dir / INTEGRITY_FILE
    if not f.is_file():
        raise MltagError(f"no {INTEGRITY_FILE}: this model folder has no recorded content hash (trained by an "
                         "older mltag, or copied without it); retrain it", model_dir)
    rec = read_json(f, "the model's content hash", "train")
    if not isinstance(rec, dict) or not isinstance(rec.get("files"), dict) or rec.get("format") != 1:
        raise MltagError("damaged content hash record; retrain the model", f)
    now = _content_files(model_dir)
    for name, sha in sorted(rec["files"].items()):
        if name not in now:
            raise MltagError(f"model file {name} is missing (it is part of the recorded content hash)", model_dir)
        if now[name] != sha:
            raise MltagError("damaged or edited: this file changed after train recorded the model's content hash; "
                             "a model whose files were edited is never loaded (retrain it, or restore the file)",
                             model_dir / name)
    extra = sorted(set(now) - set(rec["files"]))
    if extra:
        raise MltagError(f"model file {extra[0]} is not part of the recorded content hash; remove it or retrain",
                         model_dir)
    if _digest(rec["files"]) != rec.get("digest"):
        raise MltagError("damaged content hash record (its digest does not match its files); retrain the model", f)
    return rec["digest"]


def read_model_meta(model_dir: str | os.PathLike, verify: bool = True) -> dict:
    """A model folder's ``model.json``, checked: the content hash, and the label list against labels.txt.

    The label list against the output width is checked by whatever loads the weights
    (``check_output_width``).
    """
    model_dir = Path(model_dir)
    f = model_dir / "model.json"
    if not f.is_file():
        raise MltagError("not an mltag model folder (model.json missing)", model_dir)
    if verify:
        verify_integrity(model_dir)
    meta = read_json(f, "model.json", "train")
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise MltagError("model.json is damaged: 'labels' must be a non-empty list of label names", f)
    if len(set(labels)) != len(labels):
        raise MltagError("model.json lists a label twice", f)
    if not isinstance(meta.get("image_size"), int) or meta["image_size"] <= 0:
        raise MltagError("model.json is damaged: 'image_size' must be a positive integer", f)
    txt = model_dir / "labels.txt"
    if txt.is_file() and read_labels(txt) != labels:
        raise MltagError("model.json's labels differ from labels.txt in the same folder (an edited model); "
                         "retrain it", f)
    return meta


def check_output_width(labels: list[str], width: int, model_file: str | os.PathLike) -> None:
    """The model scores exactly one value per listed label, or it is refused naming the file."""
    if int(width) != len(labels):
        raise MltagError(f"the model outputs {width} scores but model.json lists {len(labels)} labels; a label "
                         "list that does not match the weights would mislabel every image", model_file)


# --------------------------------------------------------------------------- calibrate's output

OOF_KEYS = ("paths", "labels", "scores", "folds", "label_names", "reason")


def write_oof(path: str | os.PathLike, paths, y: np.ndarray, scores: np.ndarray, folds: np.ndarray,
              label_names: list[str], reason: str = "") -> None:
    """calibrate's ``oof_scores.npz``: each train+val image's out-of-fold scores (for review).

    No rows and a ``reason`` when they could not be computed (too few images, a model
    without head settings): review says so instead of ranking anything.
    """
    from mltag.common import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, paths=np.asarray(paths, dtype=str), labels=np.asarray(y, np.uint8),
                     scores=np.asarray(scores, np.float32), folds=np.asarray(folds, np.int32),
                     label_names=np.asarray(label_names, dtype=str), reason=np.asarray(reason))


def load_oof(path: str | os.PathLike) -> dict:
    """``oof_scores.npz`` as a dict (``label_names`` a list, ``reason`` a str); damage is a clear error."""
    with open_npz(path, "out-of-fold scores", "calibrate", OOF_KEYS) as z:
        out = {k: z[k] for k in OOF_KEYS}
    out["label_names"], out["reason"] = [str(x) for x in out["label_names"]], str(out["reason"])
    check_finite(out["scores"], path, "out-of-fold scores", "run calibrate again")
    n, k = len(out["paths"]), len(out["label_names"])
    if out["scores"].shape != (n, k) or out["labels"].shape != (n, k) or out["folds"].shape != (n,):
        raise MltagError("out-of-fold scores are damaged (their shapes do not match); run calibrate again", path)
    return out


def read_thresholds(path: str | os.PathLike, labels: list[str] | None = None) -> dict:
    """``thresholds.json`` from calibrate; with ``labels``, every label must have a finite threshold."""
    th = read_json(path, "thresholds file", "calibrate")
    t = th.get("thresholds") if isinstance(th, dict) else None
    if not isinstance(t, dict):
        raise MltagError("thresholds file is damaged (no 'thresholds' object); run calibrate again", path)
    for name, v in t.items():
        if not isinstance(v, (int, float)) or not np.isfinite(v):
            raise MltagError(f"thresholds file is damaged: label {name!r} has threshold {v!r}", path)
    if labels is not None:
        unknown = sorted(set(t) - set(labels))
        if unknown:
            raise MltagError(f"thresholds name label(s) the model does not score: {', '.join(unknown)}", path)
    return th
