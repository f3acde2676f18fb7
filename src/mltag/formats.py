"""The hand-offs between steps, in one place: readers of what prepare, bottleneck and train write.

Steps import these instead of importing each other, so a step's module holds only its
own work. Writers stay with the step that owns the format; the canonical ``.lst`` and
labels formats themselves live in ``mltag.common``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mltag.common import Example, MltagError, read_labels, read_lst

SPLITS = ("train", "val", "test")


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
    meta = json.loads(f.read_text(encoding="utf-8"))
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
    """Return ``(features float32, labels uint8, paths)`` for one split: the plain view only."""
    f = Path(bottlenecks) / f"{split}.npz"
    if not f.is_file():
        raise MltagError("bottleneck file not found; run the bottleneck step first", f)
    with np.load(f, allow_pickle=False) as z:
        return z["features"].astype(np.float32), z["labels"], z["paths"]


def load_views(bottlenecks: str | os.PathLike, split: str = "train") -> np.ndarray | None:
    """The augmented views ``[N, views - 1, D]`` float32 of a split, or None when there are none."""
    f = Path(bottlenecks) / f"{split}.npz"
    with np.load(f, allow_pickle=False) as z:
        return z["views"].astype(np.float32) if "views" in z.files else None


# --------------------------------------------------------------------------- train's output


def model_mode(model_dir: str | os.PathLike) -> str:
    """``head`` or ``fine_tune``: how the model folder was trained (older folders: head)."""
    f = Path(model_dir) / "model.json"
    if not f.is_file():
        raise MltagError("not an mltag model folder (model.json missing)", model_dir)
    return json.loads(f.read_text(encoding="utf-8")).get("mode", "head")
