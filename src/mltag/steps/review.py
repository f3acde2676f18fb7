"""review: likely label errors from calibrate's out-of-fold scores, and the way back to a corrected label file.

Every train and val image has a score per label from a head that never saw it (calibrate's
k refits). cleanlab's multi-label confident learning flags the (image, label) pairs whose
given label disagrees with those scores more than each label's own noise level explains
(``review.filter_by``, per-label thresholds: the mean score of the images given the label),
and ranks them by self-confidence: the out-of-fold probability of the given label. The
confidence that the given label is wrong is one minus that.

``apply_review`` takes the rows a person accepted and writes a corrected copy of the
dataset's label file beside the original, never touching the original.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np

from mltag import config
from mltag.data.formats import image_root_of, load_oof
from mltag.errors import MltagError
from mltag.files import atomic_path, csv_rows, read_user_text, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

HEADER = ("path", "label", "given", "suggested", "score", "confidence")
FILTERS = config.choices("review", "filter_by")
CHUNK = 10  # labels per cleanlab call: each is its own binary problem, so the result does not depend on it


def find_issues(y: np.ndarray, scores: np.ndarray, filter_by: str, progress: bool = False):
    """Flagged (image, label) pairs and every pair's confidence that its given label is wrong. cleanlab
    treats each label as its own binary problem, so the labels go to it a few at a time, with a progress bar
    (hundreds of labels on many images take minutes).

    Returns:
        ``(mask [N, K] bool, confidence [N, K], per-label noise rate [K])``.
    """
    import warnings

    from cleanlab.multilabel_classification.filter import find_multilabel_issues_per_class
    from cleanlab.multilabel_classification.rank import get_label_quality_scores_per_class

    y = np.asarray(y, dtype=int)
    scores = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    k = y.shape[1]
    mask = np.zeros(y.shape, bool)
    # One binary problem per label: cleanlab needs both classes present in it to estimate its noise.
    usable = [j for j in range(k) if 0 < y[:, j].sum() < len(y)]
    quality = np.zeros((len(y), len(usable)))
    from tqdm import tqdm

    with tqdm(total=len(usable), desc="review: labels", unit="label", leave=False, disable=not progress) as bar:
        for start in range(0, len(usable), CHUNK):
            part = usable[start: start + CHUNK]
            given = [list(np.flatnonzero(row)) for row in y[:, part]]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # cleanlab warns about small classes; the report says what it found
                # n_jobs=1: cleanlab's pool would fork this process (undefined with threads running)
                found = np.asarray(find_multilabel_issues_per_class(given, scores[:, part], filter_by=filter_by,
                                                                    n_jobs=1))
                quality[:, start: start + len(part)] = get_label_quality_scores_per_class(given, scores[:, part])
            mask[:, part] = found.reshape(len(y), len(part))
            bar.update(len(part))
    confidence = np.abs(y - scores)  # 1 - self-confidence: the out-of-fold probability of the other label
    if usable:
        confidence[:, usable] = 1.0 - quality
    noise = mask.mean(axis=0) if len(y) else np.zeros(k)
    return mask, confidence, noise


def review(oof: str | os.PathLike, out: str | os.PathLike, metrics_file: str | os.PathLike,
           prepared: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
           model_dir: str | os.PathLike | None = None, *, review: config.Review,
           config: dict | None = None, progress: bool = True) -> dict:
    """Rank likely label errors; write ``label_issues.csv``, ``review.html`` and the metrics.

    Args:
        oof: calibrate's ``oof_scores.npz``.
        out: the report folder (``label_issues.csv``, ``review.html``).
        prepared: the prepared dataset (its image root, for thumbnails and links); ``images``
            overrides the image root.
        model_dir: the model that scored the photos (for the saliency overlays). ``details.json`` keeps the
            figures and files for the model's MLflow run (``tracking.runs.for_the_run``): register logs them.
        review: the typed params section: ``filter_by`` (cleanlab's rule for flagging pairs) and
            ``thumbnails`` (the most likely errors shown per label in ``review.html``).
    """
    from mltag.reports.html import render, script_json
    from mltag.tracking.runs import RUN_LOG_KEY, for_the_run

    filter_by = review.filter_by
    data = load_oof(oof)
    names, paths, y, s = data["label_names"], [str(p) for p in data["paths"]], data["labels"], data["scores"]
    root = Path(images) if images else image_root_of(prepared) if prepared else None
    _check_oof_labels(oof, names, prepared, model_dir)
    if len(paths):
        mask, confidence, noise = find_issues(y, s, filter_by, progress)
    else:
        log.warning("review: no out-of-fold scores (%s); nothing to rank", data["reason"] or "none computed")
        mask, confidence, noise = np.zeros(y.shape, bool), np.zeros(y.shape), np.zeros(len(names))
    swaps = _group_swaps(mask, y, s, confidence, names, paths, _label_groups(model_dir, prepared, names))
    rows = [(paths[i], names[j], int(y[i, j]), 1 - int(y[i, j]), float(s[i, j]), float(confidence[i, j]))
            for i, j in zip(*np.nonzero(mask))] + swaps
    rows.sort(key=lambda r: (-r[5], r[0], r[1]))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    w.writerows((p, lb, g, sg, f"{sc:.6f}", f"{c:.6f}") for p, lb, g, sg, sc, c in rows)
    per_label = {n: {"issues": int(mask[:, j].sum()),
                     "missing": int((mask[:, j] & (y[:, j] == 0)).sum()),  # given 0, likely 1
                     "wrong": int((mask[:, j] & (y[:, j] == 1)).sum()),  # given 1, likely 0
                     "positives": int(y[:, j].sum()), "noise_rate": float(noise[j])}
                 for j, n in enumerate(names)}
    for _, lb, *_ in swaps:  # a swap is an error of both labels: the given one wrong, the top one missing
        a, b = lb.split(SWAP, 1)
        per_label[a]["issues"] += 1
        per_label[a]["wrong"] += 1
        per_label[b]["issues"] += 1
        per_label[b]["missing"] += 1
    result = {"images": len(paths), "pairs": int(y.size), "issues": len(rows), "swaps": len(swaps),
              "issue_rate": len(rows) / y.size if y.size else 0.0, "filter_by": filter_by,
              "per_label": per_label, "reason": data["reason"]}
    explainer = _explainer(model_dir, root, review.saliency, names)
    groups, items = _page_groups(rows, names, paths, y, s, per_label, root, out, explainer, review)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "label_issues.csv").write_text(buf.getvalue(), encoding="utf-8")
        (tmp / "review.html").write_text(render("review.html.j2", r=result, groups=groups, header=HEADER,
                                                 items_json=script_json(items),
                                                 page_id=hashlib.sha256(buf.getvalue().encode()).hexdigest()[:16]),
                                          encoding="utf-8")
        write_json_atomic(tmp / "details.json", {**result, "config": config, RUN_LOG_KEY: for_the_run({
            "review_issues": float(len(rows)), "review_issue_rate": result["issue_rate"],
            **{f"review_noise_rate_{n}": v["noise_rate"] for n, v in per_label.items()}},
            {f: "review" for f in ("label_issues.csv", "review.html", "details.json")})})
    write_json_atomic(metrics_file, {"issues": result["issues"]})
    log.info("review: %d likely label error(s) in %d (image, label) pairs of %d images; most confident first in "
             "%s/label_issues.csv, thumbnails in %s/review.html", len(rows), y.size, len(paths), out, out)
    return result


# --------------------------------------------------------------------------- the way back


def read_accepted(path: str | os.PathLike) -> list[dict]:
    """The accepted rows of a ``label_issues.csv`` (the rows a person kept), each checked."""
    path = Path(path)
    text = read_user_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != HEADER:
        raise MltagError(f"expected the header {','.join(HEADER)} (a label_issues.csv from mltag review)", path, 1)
    out, seen = [], {}
    for line, row in csv_rows(reader, len(HEADER), path):
        rec = dict(zip(HEADER, (x.strip() for x in row)))
        if rec["given"] not in ("0", "1") or rec["suggested"] not in ("0", "1"):
            raise MltagError("given and suggested must be 0 or 1", path, line)
        if rec["given"] == rec["suggested"]:
            raise MltagError(f"the row changes nothing (given and suggested are both {rec['given']}); delete it",
                             path, line)
        pair = (rec["path"], rec["label"])
        if pair in seen:
            raise MltagError(f"{rec['path']} {rec['label']} is listed twice (first on line {seen[pair]}); keep one "
                             "row", path, line)
        seen[pair] = line
        rec["given"], rec["suggested"], rec["line"] = int(rec["given"]), int(rec["suggested"]), line
        out.append(rec)
    if not out:
        raise MltagError("no accepted rows: keep the label_issues.csv rows you agree with", path)
    return out


def reviewed_name(label_file: Path) -> Path:
    """Where the corrected copy of ``label_file`` goes: beside it, ``<stem>.reviewed<suffix>``."""
    return label_file.with_name(f"{label_file.stem}.reviewed{label_file.suffix}")


def _check_oof_labels(oof, names: list[str], prepared, model_dir) -> None:
    """The out-of-fold scores' label names against the prepared dataset's and the model's, in order."""
    from mltag.data.formats import check_same_labels, read_labels, read_model_meta

    fix = "run calibrate again for this model (it writes the out-of-fold scores)"
    if prepared is not None and (Path(prepared) / "labels.txt").is_file():
        check_same_labels(read_labels(Path(prepared) / "labels.txt"), names, oof, "the out-of-fold scores", fix)
    if model_dir is not None and (Path(model_dir) / "model.json").is_file():
        check_same_labels(read_model_meta(model_dir)["labels"], names, oof, "the out-of-fold scores", fix)


SWAP = " -> "  # a label column "black -> brown": one swap within an exclusive group (black removed, brown given)


def _label_groups(model_dir, prepared, names: list[str]) -> list[list[int]]:
    """The exclusive label groups (label indices) of the model, else of the prepared dataset; none without either."""
    from mltag.data.formats import label_groups_of, read_model_meta
    from mltag.data.groups import exactly_one

    named = []
    if model_dir is not None and (Path(model_dir) / "model.json").is_file():
        named = read_model_meta(model_dir, verify=False).get("label_groups") or []
    elif prepared is not None:
        named = label_groups_of(prepared)
    index = {n: i for i, n in enumerate(names)}
    return [[index[n] for n in g] for g in exactly_one(named) if all(n in index for n in g)]


def _group_swaps(mask, y, s, confidence, names: list[str], paths: list[str], groups: list[list[int]]) -> list[tuple]:
    """Within an exclusive group a label error is a swap: where the image's given label of the group is flagged
    (or the group's top-scoring label is flagged as missing) and another label of the group scores highest, one row
    ``given -> top`` replaces the removal and the unrelated addition, so that applying it keeps the group whole.
    The group's other flagged pairs of that image are dropped from ``mask`` (in place): an addition or a removal
    alone would leave the image with two labels of the group, or none."""
    out = []
    for g in groups:
        g = np.asarray(g, dtype=int)
        flagged = np.flatnonzero(mask[:, g].any(axis=1))
        for i in flagged:
            given = g[y[i, g] > 0]
            top = g[int(np.argmax(s[i, g]))]
            if len(given) == 1 and given[0] != top:
                a = int(given[0])
                out.append((paths[i], f"{names[a]}{SWAP}{names[top]}", 1, 0, float(s[i, top]),
                            float(max(confidence[i, a], confidence[i, top]))))
            mask[i, g] = False
    return out


def _page_groups(rows: list[tuple], names: list[str], paths: list[str], y: np.ndarray, s: np.ndarray,
                 per_label: dict, root: Path | None, out, explainer, review: config.Review) -> tuple[list, list]:
    """review.html's groups (one per label, its most likely errors first) and every item shown, with its
    thumbnail and, for the first ``review.saliency`` of each label, where the model looked."""
    from mltag.reports.html import data_uri, thumbnail

    groups, items = [], []
    row_of = {p: i for i, p in enumerate(paths)}
    for n in names:
        mine = [r for r in rows if r[1] == n or r[1].split(SWAP)[0] == n][:review.thumbnails]
        shown = []
        for rank, (p, _, g, sg, sc, c) in enumerate(mine):
            i = row_of[p]
            png = explainer.overlay(root / p, names.index(n), 320) if explainer and rank < review.saliency else None
            e = {"id": len(items), "path": p, "label": n, "given": g, "suggested": sg, "score": round(sc, 6),
                 "confidence": round(c, 6), "thumb": thumbnail(root / p, 320) if root else None,
                 "overlay": data_uri(png, "image/jpeg") if png else None,
                 "href": Path(os.path.relpath(root / p, Path(out).absolute())).as_posix() if root else None,
                 "labels": [names[j] for j in range(len(names)) if y[i, j]],
                 "scores": {names[j]: round(float(s[i, j]), 4) for j in range(len(names))}}
            items.append(e)
            shown.append(e)
        groups.append({"name": n, "count": per_label[n]["issues"], "noise": per_label[n]["noise_rate"],
                       "shown": shown})
    return groups, items


def _explainer(model_dir, root, n: int, names: list[str]):
    """The saliency maps' explainer for review.html: the model's own, when there is a model folder, an image
    root and ``review.saliency`` > 0, and the model scores the same labels; else None (no overlays)."""
    if not n or model_dir is None or root is None or not (Path(model_dir) / "model.json").is_file():
        return None
    from mltag.inference.explain import explainer_for
    from mltag.inference.model import InferenceModel

    model = InferenceModel(model_dir)
    if list(model.labels) != list(names):
        log.warning("review: the model in %s scores other labels than the out-of-fold scores; no saliency overlays",
                    model_dir)
        return None
    return explainer_for(model_dir, model)


def _swap(flags: list[int], r: dict, labels: list[str], accepted: Path) -> None:
    """Apply one ``given -> suggested`` row of an exclusive group to an image's ``flags``."""
    a, b = r["label"].split(SWAP, 1)
    for n in (a, b):
        if n not in labels:
            raise MltagError(f"unknown label {n!r} in {r['label']!r} (known: {', '.join(labels)})", accepted, r["line"])
    i, j = labels.index(a), labels.index(b)
    if r["given"] != 1 or r["suggested"] != 0:
        raise MltagError(f"a swap row ({r['label']}) has given 1 and suggested 0", accepted, r["line"])
    if flags[i] != 1 or flags[j] != 0:
        raise MltagError(f"{r['path']} has {a}={flags[i]} and {b}={flags[j]} in the dataset now, not 1 and 0 (fixed "
                         "already, or a file from another dataset?)", accepted, r["line"])
    flags[i], flags[j] = 0, 1


def apply_review(accepted: str | os.PathLike, dataset: str | os.PathLike, fmt: str,
                 out: str | os.PathLike | None = None) -> Path:
    """Write the dataset's labels with the accepted changes applied, beside the original; return the file.

    An ``.lst`` dataset gets ``<name>.reviewed.lst`` next to its list (the same labels.txt
    applies), a CSV dataset ``<name>.reviewed.csv``; the other formats (folders, labels.json,
    image_list) a Kaggle-style ``reviewed.csv`` in the dataset folder. Folder inputs never
    read these copies, so the original dataset reads as before; point ``prepare.input`` at
    the copy to train on it (``dvc repro`` then versions the fix).
    """
    from mltag.data.datasets import read_dataset

    accepted = Path(accepted)
    rows = read_accepted(accepted)
    ds = read_dataset(dataset, fmt)
    index = {ex.path: i for i, ex in enumerate(ds.examples)}
    flags = [list(ex.flags) for ex in ds.examples]
    for r in rows:
        if r["path"] not in index:
            raise MltagError(f"image {r['path']!r} is not in the dataset {dataset}", accepted, r["line"])
        if SWAP in r["label"]:  # a swap within an exclusive group: both labels change, or neither
            _swap(flags[index[r["path"]]], r, ds.labels, accepted)
            continue
        if r["label"] not in ds.labels:
            raise MltagError(f"unknown label {r['label']!r} (known: {', '.join(ds.labels)})", accepted, r["line"])
        i, j = index[r["path"]], ds.labels.index(r["label"])
        if flags[i][j] != r["given"]:
            raise MltagError(f"{r['path']} has {r['label']}={flags[i][j]} in the dataset now, not {r['given']} (fixed "
                             "already, or a file from another dataset?)", accepted, r["line"])
        flags[i][j] = r["suggested"]
    changed = sum(list(ex.flags) != f for ex, f in zip(ds.examples, flags))
    source = Path(ds.examples[0].source.rpartition(":")[0]) if ds.examples else Path(dataset)
    if ds.fmt == "lst":
        target = Path(out) if out else reviewed_name(source)
        text = "".join("\t".join([str(i), *map(str, f), ex.path]) + "\n" for i, (ex, f) in enumerate(zip(ds.examples,
                                                                                                        flags)))
    else:
        target = Path(out) if out else reviewed_name(source) if ds.fmt == "csv" else ds.image_root / "reviewed.csv"
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["path", "labels"])
        w.writerows([ex.path, " ".join(n for n, v in zip(ds.labels, f) if v)] for ex, f in zip(ds.examples, flags))
        text = buf.getvalue()
    if target.resolve() == source.resolve():
        raise MltagError("the corrected file would replace the original; give another --out", target)
    protected = {source.resolve(), *(f.resolve() for f in (ds.image_root / n for n in (
        "labels.txt", "labels.json", "classes.txt", "all.lst", "image_list", "image_label")) if f.exists())}
    if target.resolve() in protected:
        raise MltagError("the corrected file would replace one of the dataset's own files (its labels or list); "
                         "give another --to (the default writes a .reviewed copy beside the original)", target)
    if ds.fmt != "lst" and not (target.parent / "labels.txt").is_file() and target.parent == ds.image_root:
        log.info("review apply: labels come from the CSV's rows; a label left with no image would disappear")
    write_text_atomic(target, text)
    log.info("review apply: %d change(s) to %d image(s) from %s written to %s (the original is untouched)",
             len(rows), changed, accepted, target)
    return target
