"""The machinery of the JSON and ``.npz`` hand-offs (``formats`` has each file's reader and writer): format
versions, and a clear error naming the file when one is missing, damaged, not finite or newer than this mltag."""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from mltag.errors import MltagError
from mltag.files import json_default

# The format each JSON hand-off is written in. A reader takes this version and older ones
# (a file without "format" is version 1) and refuses a newer one, naming the file.
FORMATS = {"dataset.json": 1, "bottleneck.json": 2, "model.json": 2, "thresholds.json": 1, "run.json": 1,
           "images.json": 1, "integrity.json": 1}


def write_handoff(path: str | os.PathLike, obj: dict, name: str | None = None) -> None:
    """Write a JSON hand-off with its ``format`` version first, into a folder or temp path being built
    (``atomic_path``) by the caller."""
    path = Path(path)
    text = json.dumps({"format": FORMATS[name or path.name], **obj}, indent=2, default=json_default) + "\n"
    path.write_text(text, encoding="utf-8")


def read_handoff(path: str | os.PathLike, what: str, written_by: str, name: str | None = None) -> dict:
    """A JSON hand-off as a dict: missing, damaged, not an object or of a newer format is a clear error."""
    path = Path(path)
    obj = read_json(path, what, written_by)
    if not isinstance(obj, dict):
        raise MltagError(f"{what} is damaged (not a JSON object); run {written_by} again", path)
    version, known = obj.get("format", 1), FORMATS[name or path.name]
    if not isinstance(version, int) or version > known:
        raise MltagError(f"{what} is format {version!r}, newer than this mltag reads ({known}); upgrade mltag or "
                         f"run {written_by} again", path)
    return obj


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
