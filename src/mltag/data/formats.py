"""The hand-offs between steps, in one place: a reader and a writer for every file one step
writes and another reads (labels and ``.lst``, ``hashes.tsv``, the split vectors,
``bottleneck.json``, ``model.json``, ``integrity.json``, ``thresholds.json``, ``scores.npz``,
``oof_scores.npz``, ``run.json``, ``images.json``).

Steps import these instead of importing each other, and nothing else opens these files.
A JSON hand-off carries ``"format": N``; a reader refuses a newer format than it knows,
naming the file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mltag.data.handoff import check_finite, open_npz, read_handoff, write_handoff
from mltag.errors import MltagError
from mltag.files import atomic_path, read_user_text, write_text_atomic

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- labels and .lst


# A label name becomes a file name (a PR-curve CSV) and part of MLflow metric names: letters (any script),
# digits, '_', '-', '.', ':' and spaces, starting with a letter or digit. MLflow refuses '<', '&', '"'...
LABEL_NAME = re.compile(r"^\w[\w .:-]{0,199}$")


def check_label_name(name: str, path=None, line: int | None = None) -> None:
    """Refuse a label name that could become a path or that MLflow refuses, naming where it is and a fix."""
    if LABEL_NAME.match(name) and not name.endswith((" ", ".")):
        return
    fix = re.sub(r"[^\w .:-]+", "_", name).strip("_ .:-")[:200] or "label"
    raise MltagError(f"label name {name!r} cannot be used: a label becomes a file name and an MLflow metric "
                     "name, so it holds only letters, digits, '_', '-', '.', ':' and spaces (at most 200), starting "
                     f"with a letter or digit; rename it, for example to {fix!r}", path, line)


def read_labels(path: str | os.PathLike) -> list[str]:
    """Read label names from labels.txt (one per line) or labels.json (a list, or {"labels": [...]})."""
    path = Path(path)
    if not path.is_file():
        raise MltagError("label file not found", path)
    if path.suffix == ".json":
        try:
            data = json.loads(read_user_text(path))
        except json.JSONDecodeError as e:
            raise MltagError(f"invalid JSON: {e.msg}", path, e.lineno) from None
        if isinstance(data, dict):
            data = data.get("labels")
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise MltagError("expected a list of label names (or {\"labels\": [...]})", path)
        names = [x.strip() for x in data]
        lines = list(range(1, len(names) + 1))
    else:
        names, lines = [], []
        for i, raw in enumerate(read_user_text(path).splitlines(), 1):
            if raw.strip():
                names.append(raw.strip())
                lines.append(i)
    if not names:
        raise MltagError("no label names", path)
    seen: dict[str, int] = {}
    for name, line in zip(names, lines):
        if not name:
            raise MltagError("empty label name", path, line)
        check_label_name(name, path, line)
        if name in seen:
            raise MltagError(f"duplicate label {name!r} (first on line {seen[name]})", path, line)
        seen[name] = line
    return names


def write_labels(path: str | os.PathLike, labels: Sequence[str]) -> None:
    write_text_atomic(path, "".join(f"{x}\n" for x in labels))


@dataclass(frozen=True)
class Example:
    """One image and its 0/1 label flags."""

    path: str  # relative to the image root, '/'-separated
    flags: tuple[int, ...]
    source: str = ""  # "file:line" it came from, for messages


def read_lst(path: str | os.PathLike, n_labels: int | None = None) -> list[Example]:
    """Parse ``index<TAB>flag_1..flag_N<TAB>relative/path`` lines, validating each."""
    path = Path(path)
    if not path.is_file():
        raise MltagError("list file not found", path)
    out: list[Example] = []
    seen_idx: dict[str, int] = {}
    seen_path: dict[str, int] = {}
    for i, raw in enumerate(read_user_text(path).splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        cols = raw.rstrip("\r\n").split("\t")
        if len(cols) < 3:
            raise MltagError(
                f"expected index<TAB>flags...<TAB>path, got {len(cols)} tab-separated column(s)", path, i
            )
        idx, flags, rel = cols[0].strip(), cols[1:-1], cols[-1].strip()
        if n_labels is not None and len(flags) != n_labels:
            raise MltagError(f"expected {n_labels} label flags, got {len(flags)}", path, i)
        bad = [f for f in flags if f.strip() not in ("0", "1")]
        if bad:
            raise MltagError(f"label flags must be 0 or 1, got {bad[0]!r}", path, i)
        if idx in seen_idx:
            raise MltagError(f"duplicate index {idx!r} (first on line {seen_idx[idx]})", path, i)
        if rel in seen_path:
            raise MltagError(f"duplicate path {rel!r} (first on line {seen_path[rel]})", path, i)
        seen_idx[idx] = i
        seen_path[rel] = i
        out.append(Example(rel, tuple(int(f) for f in flags), f"{path}:{i}"))
    return out


def write_lst(path: str | os.PathLike, examples: Sequence[Example]) -> None:
    lines = [
        "\t".join([str(i), *(str(f) for f in ex.flags), ex.path]) + "\n" for i, ex in enumerate(examples)
    ]
    write_text_atomic(path, "".join(lines))


# --------------------------------------------------------------------------- versioned JSON hand-offs

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
    meta = read_handoff(f, "dataset.json", "prepare")
    if not isinstance(meta.get("image_root"), str):
        raise MltagError("dataset.json is damaged (no image_root); run prepare again", f)
    labels = meta.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise MltagError(f"dataset.json is damaged (labels: {str(labels)[:60]!r}, not a list of names); run prepare "
                         "again", f)
    return (prepared / meta["image_root"]).resolve()


def dataset_source(prepared: str | os.PathLike) -> str:
    """What prepare read (``prepare.input`` as given), from ``dataset.json``."""
    f = Path(prepared) / "dataset.json"
    if not f.is_file():
        raise MltagError("not a prepared dataset folder (dataset.json missing); run prepare first", prepared)
    source = read_handoff(f, "dataset.json", "prepare").get("source")
    if not isinstance(source, str):
        raise MltagError("dataset.json is damaged (no source); run prepare again", f)
    return source


def dataset_version(prepared: str | os.PathLike) -> str | None:
    """The data's own version prepare recorded (``dvc:...``, ``git:...``, ``untracked (...)``), or None."""
    f = Path(prepared) / "dataset.json"
    if not f.is_file():
        return None
    version = read_handoff(f, "dataset.json", "prepare").get("dataset_version")
    return version if isinstance(version, str) else None


def label_groups_of(prepared: str | os.PathLike) -> list[list[str]]:
    """The exclusive label groups prepare recorded (``label_groups`` in ``dataset.json``); none for a folder without
    (an older prepare, or no prepared folder at all)."""
    f = Path(prepared) / "dataset.json"
    if not f.is_file():
        return []
    groups = read_handoff(f, "dataset.json", "prepare").get("label_groups") or []

    def names(g):  # an exactly-one group is a list of names, an at-most-one group {"at_most_one": names}
        return g.get("at_most_one") if isinstance(g, dict) else g

    if not isinstance(groups, list) or not all(isinstance(names(g), list) and all(isinstance(n, str) for n in names(g))
                                               for g in groups):
        raise MltagError("dataset.json is damaged (label_groups is not a list of label lists); run prepare again", f)
    return groups


def write_dataset_meta(prepared: str | os.PathLike, meta: dict) -> None:
    """prepare's ``dataset.json``: where the images are (``image_root``, relative), the labels and counts."""
    write_handoff(Path(prepared) / "dataset.json", meta)


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


def write_split(folder: str | os.PathLike, split: str, features: np.ndarray, labels: np.ndarray,
                paths: list[str], views: np.ndarray | None = None) -> None:
    """One split's vectors: ``features [N, D]`` float16 (the plain view), ``labels [N, L]`` uint8,
    ``paths [N]``, and for the train split ``views [N, V-1, D]`` (the augmented views)."""
    arrays = {"features": np.asarray(features, np.float16), "labels": np.asarray(labels, np.uint8),
              "paths": np.asarray(paths, dtype=str)}
    if views is not None:
        arrays["views"] = np.asarray(views, np.float16)
    np.savez(Path(folder) / f"{split}.npz", **arrays)


def write_bottleneck_meta(folder: str | os.PathLike, meta: dict) -> None:
    """``bottleneck.json``: what the split vectors depend on, and nothing else (a rerun on the same
    data writes the same bytes)."""
    write_handoff(Path(folder) / "bottleneck.json", meta)


def load_split(bottlenecks: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(features, labels uint8, paths)`` for one split: the plain view only.

    The features stay as stored (float16): half the memory of float32, and every consumer casts
    a batch at a time (the cast is exact).
    """
    f = Path(bottlenecks) / f"{split}.npz"
    with open_npz(f, "bottleneck file", "the bottleneck step", ("features", "labels", "paths")) as z:
        x, y, p = z["features"], z["labels"], z["paths"]
    _check_split_shapes(bottlenecks, f, x, y, p)
    check_finite(x, f, f"{split} vectors", "rerun the bottleneck step (its cache never keeps such vectors)")
    return x, y, p


def _check_split_shapes(bottlenecks, f: Path, x: np.ndarray, y: np.ndarray, p: np.ndarray) -> None:
    """A split file's arrays agree with each other and with ``bottleneck.json`` (its vector length) and
    ``labels.txt`` (its label columns): a cut or mixed file is damage, said as such."""
    problems = []
    if x.ndim != 2 or y.ndim != 2 or p.ndim != 1 or not len(x) == len(y) == len(p):
        problems.append(f"features {x.shape}, labels {y.shape}, paths {p.shape} do not agree")
    meta_file = Path(bottlenecks) / "bottleneck.json"
    if not problems and meta_file.is_file():
        dim = read_handoff(meta_file, "bottleneck output", "the bottleneck step").get("feature_dim")
        if isinstance(dim, int) and dim and x.shape[1] != dim:
            problems.append(f"vectors of {x.shape[1]} values, but bottleneck.json says {dim}")
    labels_file = Path(bottlenecks) / "labels.txt"
    if not problems and labels_file.is_file():
        n = len(read_labels(labels_file))
        if y.shape[1] != n:
            problems.append(f"{y.shape[1]} label columns, but labels.txt names {n}")
    if problems:
        raise MltagError(f"bottleneck file is damaged ({problems[0]}); rerun the bottleneck step", f)


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
    meta = read_handoff(f, "bottleneck output", "the bottleneck step")
    missing = [k for k in ("backbone_handle", "backbone_id", "image_size", "preprocessing") if k not in meta]
    if missing:
        raise MltagError(f"bottleneck.json is damaged (no {', '.join(missing)}); rerun the bottleneck step", f)
    bad = [k for k, ok in (("image_size", _sized(meta["image_size"])),
                           ("views", isinstance(meta.get("views", 1), int) and 1 <= meta.get("views", 1) <= 64),
                           ("feature_dim", meta.get("feature_dim") is None or (
                               isinstance(meta["feature_dim"], int) and 0 <= meta["feature_dim"] <= 1 << 16)),
                           ("images", meta.get("images") is None or isinstance(meta["images"], int))) if not ok]
    if bad:
        raise MltagError(f"bottleneck.json is damaged ({', '.join(f'{k}: {meta.get(k)!r}' for k in bad)}); rerun the "
                         "bottleneck step", f)
    return meta


MIN_SIZE, MAX_SIZE = 16, 2048  # pixels a side: anything else read from a file is damage, not a setting


def _sized(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and MIN_SIZE <= v <= MAX_SIZE


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


def write_model_meta(model_dir: str | os.PathLike, meta: dict) -> None:
    """train's ``model.json``: labels, image size, backbone, preprocessing, the head's settings and mode."""
    write_handoff(Path(model_dir) / "model.json", meta)


HEAD_FILE = "head.npz"


def write_head(model_dir: str | os.PathLike, weights: list[np.ndarray], labels: list[str] | None = None) -> None:
    """The head's Dense weights (``w0, b0[, w1, b1]``): what scoring cached vectors loads; and the label names
    of its output columns, in order (``labels``), so a model folder whose label list was reordered or renamed
    afterwards is caught (``check_same_labels``)."""
    arrays = {f"w{i}": np.asarray(w, np.float32) for i, w in enumerate(weights)}
    if labels is not None:
        arrays["labels"] = np.array([str(x) for x in labels])
    np.savez(Path(model_dir) / HEAD_FILE, **arrays)


def check_same_labels(want: list[str], got, where: str | os.PathLike, what: str, fix: str) -> None:
    """``got`` (label names from another file, in its order) must be ``want`` exactly: the same names in the same
    order, since columns are matched by position. Else a clear error naming the file."""
    got = [str(x) for x in got]
    if list(want) == got:
        return
    if sorted(want) == sorted(got):
        raise MltagError(f"{what} lists the same labels in another order ({', '.join(got[:6])}"
                         f"{', ...' if len(got) > 6 else ''} against {', '.join(list(want)[:6])}"
                         f"{', ...' if len(want) > 6 else ''}): columns are matched by position, so the names would "
                         f"be wrong; {fix}", where)
    raise MltagError(f"{what} names other labels ({', '.join(got[:6])}{', ...' if len(got) > 6 else ''}) than "
                     f"{', '.join(list(want)[:6])}{', ...' if len(want) > 6 else ''}; {fix}", where)


def read_head_labels(model_dir: str | os.PathLike) -> list[str] | None:
    """The label names ``head.npz`` was written with, or None (no head, or one written before they were kept)."""
    f = Path(model_dir) / HEAD_FILE
    if not f.is_file():
        return None
    with open_npz(f, "head weights", "train") as z:
        return [str(x) for x in z["labels"]] if "labels" in z.files else None


def read_head(model_dir: str | os.PathLike) -> list[np.ndarray] | None:
    """The head's weights from ``head.npz``, or None for a folder written before it existed."""
    f = Path(model_dir) / HEAD_FILE
    if not f.is_file():
        return None
    with open_npz(f, "head weights", "train") as z:
        weights = [z[f"w{i}"] for i in range(sum(1 for k in z.files if re.fullmatch(r"w\d+", k)))]
    if len(weights) not in (2, 4) or any(w.ndim != (2 if i % 2 == 0 else 1) for i, w in enumerate(weights)):
        raise MltagError("head weights are damaged (expected w0, b0[, w1, b1]); run train again", f)
    check_finite(np.concatenate([w.ravel() for w in weights]), f, "head weights", "run train again")
    return weights


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
        from mltag.data.integrity import verify_integrity  # it reads and writes through this module

        verify_integrity(model_dir)
    meta = read_handoff(f, "model.json", "train")
    labels = meta.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise MltagError("model.json is damaged: 'labels' must be a non-empty list of label names", f)
    if len(set(labels)) != len(labels):
        raise MltagError("model.json lists a label twice", f)
    if not _sized(meta.get("image_size")):
        raise MltagError(f"model.json is damaged: 'image_size' must be an integer from {MIN_SIZE} to {MAX_SIZE}, "
                         f"got {meta.get('image_size')!r}", f)
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
    if n and (out["scores"].min() < 0 or out["scores"].max() > 1):
        raise MltagError("out-of-fold scores are damaged (a score outside [0, 1]); run calibrate again", path)
    return out


def write_thresholds(path: str | os.PathLike, th: dict) -> None:
    """calibrate's ``thresholds.json`` (``{"thresholds": {label: t}, ...}``), written atomically."""
    with atomic_path(path) as tmp:
        write_handoff(tmp, th, "thresholds.json")


def read_thresholds(path: str | os.PathLike, labels: list[str] | None = None) -> dict:
    """``thresholds.json`` from calibrate; with ``labels``, every label must have a finite threshold."""
    th = read_handoff(path, "thresholds file", "calibrate", "thresholds.json")
    t = th.get("thresholds")
    if not isinstance(t, dict):
        raise MltagError("thresholds file is damaged (no 'thresholds' object); run calibrate again", path)
    for name, v in t.items():
        # a score is in [0, 1]: a threshold outside it silences (or always fires) its label
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise MltagError(f"thresholds file is damaged: label {name!r} has threshold {v!r} (a threshold is a "
                             "number in [0, 1]); run calibrate again", path)
    g = th.get("global_threshold", 0.5)
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 <= g <= 1.0:
        raise MltagError(f"thresholds file is damaged: global_threshold is {g!r} (a number in [0, 1]); run "
                         "calibrate again", path)
    groups = []
    for key in ("groups", "at_most_one"):
        part = th.get(key, [])
        if not isinstance(part, list) or any(not isinstance(gr, list) or len(gr) < 2 or
                                             not all(isinstance(n, str) for n in gr) for gr in part):
            raise MltagError(f"thresholds file is damaged: '{key}' must be a list of label lists of two or more; "
                             "run calibrate again", path)
        groups += part
    seen = [n for gr in groups for n in gr]
    if len(seen) != len(set(seen)):
        raise MltagError("thresholds file is damaged: a label is in two exclusive groups; run calibrate again", path)
    if labels is not None:
        strangers = sorted(set(seen) - set(labels))
        if strangers:
            raise MltagError(f"thresholds' exclusive groups name label(s) the model does not score: "
                             f"{', '.join(strangers)}", path)
        unknown = sorted(set(t) - set(labels))
        if unknown:
            raise MltagError(f"thresholds name label(s) the model does not score: {', '.join(unknown)}", path)
        missing = [n for n in labels if n not in t]
        if missing:
            raise MltagError(f"thresholds miss label(s) the model scores: {', '.join(missing)}; run calibrate "
                             "again", path)
    return th


# --------------------------------------------------------------------------- run.json and images.json


def write_run_ref(folder: str | os.PathLike, ref: dict) -> None:
    """``run.json``: the MLflow run a model folder was trained in (run and experiment ids, the masked URI)."""
    write_handoff(Path(folder) / "run.json", ref)


def read_run_ref(folder: str | os.PathLike) -> dict | None:
    """``run.json``, or None when the folder has none."""
    f = Path(folder) / "run.json"
    if not f.is_file():
        return None
    ref = read_handoff(f, "the model's MLflow run record", "train")
    if not isinstance(ref.get("run_id"), str):
        raise MltagError("the model's MLflow run record is damaged (no run_id); run train again", f)
    return ref


IMAGES_FILE = "images.json"


def write_images_ref(dataset_dir: str | os.PathLike, root: str, repo: str = "", rev: str = "") -> None:
    """A Kubeflow dataset artifact's ``images.json``: where its images are read from (a folder every
    pod sees, a bucket URI, or a path in a DVC repo at a commit); the artifact holds no images."""
    write_handoff(Path(dataset_dir) / IMAGES_FILE, {"root": root, "repo": repo, "rev": rev})


def read_images_ref(dataset_dir: str | os.PathLike) -> dict:
    f = Path(dataset_dir) / IMAGES_FILE
    ref = read_handoff(f, "the dataset's image reference", "prepare")
    if not all(isinstance(ref.get(k), str) for k in ("root", "repo", "rev")):
        raise MltagError("the dataset's image reference is damaged (needs root, repo and rev); run prepare again", f)
    return ref
