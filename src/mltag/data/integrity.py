"""A model folder's content hash (``integrity.json``): written by train, checked by every loader, so a model
whose label list no longer matches its weights (an edited, added or missing file) is never served."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mltag.data.handoff import read_handoff, write_handoff
from mltag.errors import MltagError
from mltag.files import sha256_file

INTEGRITY_FILE = "integrity.json"
# What a model's identity covers: its label list and settings, and every weight file. Run
# bookkeeping (run.json, config.json, summary.json, history.json) is not the model.
_MODEL_CONTENT = ("model.json", "labels.txt", "head.npz", "head.keras", "model.tflite", "model_int8.tflite", "backbone",
                  "inference")


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
    write_handoff(model_dir / INTEGRITY_FILE, {"algorithm": "sha256", "digest": digest, "files": files})
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
    rec = read_handoff(f, "the model's content hash", "train")
    if not isinstance(rec.get("files"), dict):
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


def recorded_digest(model_dir: str | os.PathLike) -> str | None:
    """The content hash train recorded for a model folder, unchecked (None when it has none): what evaluate's
    report names, so calibrate can tell an evaluation of another model."""
    try:
        digest = json.loads((Path(model_dir) / INTEGRITY_FILE).read_text(encoding="utf-8")).get("digest")
    except (OSError, ValueError, AttributeError):
        return None
    return digest if isinstance(digest, str) else None
