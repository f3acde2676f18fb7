"""``mltag suggest``: which unlabelled images to label next (active learning).

Each image gets the model's scores and a feature vector from the vector store (cached by
content, so a second call on the same folder computes nothing). Images are ranked by
uncertainty (the mean binary entropy over labels, and how close the nearest score is to its
label's threshold), then picked greedily for diversity: each next pick maximises its
uncertainty times its distance to the nearest image already picked (k-center greedy on the
vectors), so a hundred near-duplicates of one hard photo do not fill the list.

Beside the CSV it writes a labelling page (``suggest.html`` for ``--out suggest.csv``): each pick with
label toggles pre-filled with the model's labels at its thresholds, keyboard-driven, kept across
reloads, exporting a ``path,labels`` CSV that prepare reads (its ``csv`` format).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from mltag.errors import MltagError
from mltag.files import write_text_atomic
from mltag.inference.vectors import list_images, vectors_for

log = logging.getLogger(__name__)


def uncertainty(scores: np.ndarray, thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: mean binary entropy over labels (bits, 0-1), the smallest distance of a score to its
    label's threshold, and the two combined (``0.5 * entropy + 0.5 * closeness``, 0-1)."""
    s = np.clip(np.asarray(scores, np.float64), 1e-7, 1 - 1e-7)
    entropy = np.mean(-(s * np.log2(s) + (1 - s) * np.log2(1 - s)), axis=1)
    margin = np.min(np.abs(s - thresholds[None, :]), axis=1)
    closeness = 1.0 - np.minimum(1.0, margin / 0.5)
    return {"entropy": entropy, "margin": margin, "uncertainty": 0.5 * entropy + 0.5 * closeness}


def pick_diverse(u: np.ndarray, vectors: np.ndarray, n: int, pool: int = 5) -> tuple[list[int], np.ndarray]:
    """``n`` indices: the most uncertain first, then each maximising uncertainty x distance to the
    nearest pick (k-center greedy over the ``pool * n`` most uncertain). Returns the picks and each
    pick's distance to the picks before it (normalised to the largest such distance; 1 for the first)."""
    n = min(n, len(u))
    if n == 0:
        return [], np.zeros(0)
    cand = np.argsort(-u, kind="stable")[: max(n, pool * n)]
    v = vectors[cand] / np.maximum(np.linalg.norm(vectors[cand], axis=1, keepdims=True), 1e-12)
    nearest = np.full(len(cand), np.inf)
    picks, dist = [0], [np.inf]
    nearest = np.minimum(nearest, np.linalg.norm(v - v[0], axis=1))
    for _ in range(n - 1):
        gain = u[cand] * nearest
        gain[picks] = -1.0
        j = int(np.argmax(gain))
        picks.append(j)
        dist.append(nearest[j])
        nearest = np.minimum(nearest, np.linalg.norm(v - v[j], axis=1))
    d = np.asarray(dist, np.float64)
    finite = d[np.isfinite(d)]
    d = np.where(np.isfinite(d), d / (finite.max() if finite.size and finite.max() > 0 else 1.0), 1.0)
    return [int(cand[j]) for j in picks], d


def suggest(model: str, images: str, n: int, out: str | os.PathLike, *, store: str, backbone_cache_dir: str = "",
            engine: str = "auto", tracking_uri: str | None = None, progress: bool = True) -> dict:
    """Rank unlabelled ``images`` for labelling with ``model``; write the top ``n`` to ``out`` (CSV)."""
    from mltag.data.formats import read_model_meta, read_thresholds
    from mltag.tracking import runs as tracking

    if n < 1:
        raise MltagError(f"--n must be at least 1, got {n}")
    folder = tracking.local_model(model, tracking_uri)
    meta = read_model_meta(folder)
    labels = meta["labels"]
    th_file = folder / "thresholds.json" if (folder / "thresholds.json").is_file() else folder.parent / "thresholds.json"
    from mltag.metrics import decide, decision_rule

    thresholds, min_labels, groups = decision_rule(read_thresholds(th_file, labels) if th_file.is_file() else None,
                                                   labels)
    files = list_images(images)
    bad: dict[str, str] = {}  # an unreadable image is left out with a warning, as predict labels the others
    vectors, computed = vectors_for(files, meta, store, backbone_cache_dir, engine, progress, skip_bad=bad)
    if bad:
        files = [f for f in files if str(f) not in bad]
        first = next(iter(bad.items()))
        log.warning("suggest: %d unreadable image(s) left out, the first %s (%s)", len(bad), first[0], first[1])
        if not files:
            raise MltagError(f"no readable image among {len(bad)} (the first: {first[0]}: {first[1]})", images)
    if meta.get("mode", "head") == "fine_tune":  # the cached vectors are the frozen backbone's: score end to end
        from mltag.inference.model import InferenceModel

        scores = InferenceModel(folder).scores(files)
    else:
        from mltag.head.saved import head_scores

        scores = head_scores(folder, vectors)
    u = uncertainty(scores, thresholds)
    picks, novelty = pick_diverse(u["uncertainty"], vectors, n)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "path", "uncertainty", "entropy", "margin", "novelty", "predicted",
                *(f"score_{lb}" for lb in labels)])
    chosen = decide(scores, thresholds, min_labels, groups)
    for rank, (i, nov) in enumerate(zip(picks, novelty), 1):
        predicted = " ".join(lb for lb, hit in zip(labels, chosen[i]) if hit)
        w.writerow([rank, str(files[i]), f"{u['uncertainty'][i]:.4f}", f"{u['entropy'][i]:.4f}",
                    f"{u['margin'][i]:.4f}", f"{nov:.4f}", predicted, *(f"{s:.4f}" for s in scores[i])])
    write_text_atomic(out, buf.getvalue())
    page = label_page_path(out)
    write_text_atomic(page, label_page([files[i] for i in picks], labels, scores[picks], chosen[picks], images,
                                       str(Path(out).resolve()), groups=[[labels[j] for j in g] for g in groups]))
    log.debug("suggest: %d of %d images ranked for labelling in %s (%d vectors computed, %d from the vector store)",
             len(picks), len(files), out, computed, len(files) - computed)
    return {"images": len(files), "suggested": len(picks), "computed": computed, "model": str(folder),
            "page": str(page), "unreadable": sorted(bad)}


# The labelling page's toggle keys, label by label: 1-9, 0, then the letters (Enter, the arrows and / do the rest).
LABEL_KEYS = list("1234567890abcdefghijklmnopqrstuvwxyz")


def label_page_path(out: str | os.PathLike) -> Path:
    """Where the labelling page goes: beside the CSV, ``.html`` for its suffix."""
    out = Path(out)
    return out.with_suffix(".html") if out.suffix.lower() != ".html" else out.with_name(out.name + ".page.html")


def image_root(images: str, files: list[Path]) -> Path:
    """The folder the export's paths are relative to: ``--images`` when it is a folder, else the
    deepest folder holding every image."""
    if Path(images).is_dir():
        return Path(images).resolve()
    return Path(os.path.commonpath([str(Path(f).resolve().parent) for f in files])) if files else Path.cwd()


def label_page(files: list[Path], labels: list[str], scores: np.ndarray, chosen: np.ndarray, images: str,
               page_key: str, groups: list[list[str]] = ()) -> str:
    """The labelling page (``reports/templates/label.html.j2``): one self-contained file, thumbnails inline. In an
    exclusive group (label names) choosing one label clears the others: a choice within the group."""
    from mltag.reports.html import render, script_json, thumbnail

    root = image_root(images, files)
    items = []
    for i, (f, s, hit) in enumerate(zip(files, scores, chosen)):
        items.append({"id": i, "path": str(f), "rel": Path(f).resolve().relative_to(root).as_posix(),
                      "thumb": thumbnail(Path(f), 320), "predicted": [lb for lb, h in zip(labels, hit) if h],
                      "scores": {lb: round(float(v), 4) for lb, v in zip(labels, s)}})
    page_id = hashlib.sha256(json.dumps([page_key] + [e["rel"] for e in items]).encode()).hexdigest()[:16]
    return render("label.html.j2", items=items, labels=labels, root=str(root), page_id=page_id, keys=LABEL_KEYS,
                  groups=[list(g) for g in groups],
                  items_json=script_json(items))
