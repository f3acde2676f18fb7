"""Multi-label metrics that a reader can trust, with bootstrap intervals and baselines."""

from __future__ import annotations

import numpy as np


def average_precisions(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Per-label average precision; NaN for a label with no positives.

    The same value as ``sklearn.metrics.average_precision_score`` (one precision per distinct
    score, weighted by the recall it adds; ties count together), computed in numpy: the
    bootstrap calls it a thousand times, where sklearn's input checks cost a millisecond each.
    """
    return Ranked(y, s).average_precisions()


class Ranked:
    """Each label's images sorted by score once, so that average precision under many weightings of the
    images (the bootstrap's) costs two cumulative sums each. ``average_precisions(w)`` is sklearn's
    ``average_precision_score`` with ``sample_weight=w`` (all ones when None)."""

    def __init__(self, y: np.ndarray, s: np.ndarray):
        y = np.asarray(y)
        s = np.asarray(s, dtype=np.float64)
        self.n, self.k = y.shape
        # every label at once: each column sorted by score (ties in their original order, as sklearn)
        self.order = np.argsort(-s, axis=0, kind="mergesort")
        self.ys = np.take_along_axis(y > 0, self.order, axis=0)
        ss = np.take_along_axis(s, self.order, axis=0)
        self.last = np.ones((self.n, self.k), bool)  # the last row of each run of equal scores: ties count together
        self.last[:-1] = ss[:-1] != ss[1:]

    def average_precisions(self, w: np.ndarray | None = None) -> np.ndarray:
        n, k = self.n, self.k
        if n == 0:
            return np.full(k, np.nan)
        ws = np.ones((n, k)) if w is None else np.asarray(w, np.float64)[self.order]
        tps = np.cumsum(np.where(self.ys, ws, 0.0), axis=0)
        seen = np.cumsum(ws, axis=0)
        at_last = np.where(self.last, tps, 0.0)
        before = np.zeros((n, k))
        before[1:] = np.maximum.accumulate(at_last, axis=0)[:-1]  # true positives at the previous distinct score
        positives = tps[-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tps / seen
            ap = np.sum(np.where(self.last, (tps - before) * precision, 0.0), axis=0) / positives
        return np.where(positives > 0, ap, np.nan)


def resample_weights(rng: np.random.Generator, n: int) -> np.ndarray:
    """One bootstrap resample of ``n`` images as weights (the Bayesian bootstrap: Dirichlet(1, ..., 1), scaled to
    sum to ``n``). Every image stays in with a positive weight, so every label with a positive keeps it in every
    resample (the set of labels averaged never changes), and no image is copied into a tie with itself, which
    inflated a rare label's average precision in a resample that drew its one positive twice."""
    w = rng.exponential(1.0, n)
    return w * (n / w.sum())


def _micro_f1(y: np.ndarray, pred: np.ndarray, w: np.ndarray | None = None) -> float:
    """Micro F1 of 0/1 predictions; with ``w``, each image counted with its weight."""
    if w is None:
        tp = int(np.sum((y > 0) & (pred > 0)))
        denominator = int(np.sum(y > 0)) + int(np.sum(pred > 0))
    else:
        tp = float(w @ np.sum((y > 0) & (pred > 0), axis=1))
        denominator = float(w @ (np.sum(y > 0, axis=1) + np.sum(pred > 0, axis=1)))
    return 2.0 * tp / denominator if denominator else 0.0


def precision_recall_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sklearn.metrics.precision_recall_curve`` for one label, in numpy (a test compares the two):
    precision and recall at each distinct score taken as the threshold, ascending, with the
    final (precision 1, recall 0) point; the thresholds. Importing sklearn costs a step 1.5 s."""
    y = np.asarray(y).ravel() > 0
    s = np.asarray(s, dtype=np.float64).ravel()
    order = np.argsort(s, kind="mergesort")[::-1]
    ys, ss = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]  # the last index of each distinct score
    tps = np.cumsum(ys)[last].astype(np.float64)
    fps = 1 + last - tps
    ps = tps + fps
    precision = np.divide(tps, ps, out=np.zeros_like(tps), where=ps != 0)
    recall = np.ones_like(tps) if not len(tps) or tps[-1] == 0 else tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], ss[last][::-1]


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``'s value): the Mann-Whitney
    statistic, tied scores counting one half. Needs both classes."""
    y = np.asarray(y).ravel() > 0
    s = np.asarray(s, dtype=np.float64).ravel()
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ss)) + 1]
    ends = np.r_[starts[1:], len(ss)]
    ranks = np.empty(len(s))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # 1-based, ties averaged
    n1 = int(y.sum())
    n0 = len(y) - n1
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


class AtMostOne(list):
    """A group of label indices of which an image has at most one (declared in ``prepare.label_groups``): its
    top-scoring label where that reaches its threshold, else none. A plain list is an exactly-one group."""


def decision_rule(th: dict | None, labels: list[str]) -> tuple[np.ndarray, int, list[list[int]]]:
    """What ``decide`` takes from calibrate's thresholds (``thresholds.json``, or None): each label's
    threshold (0.5 where it names none), ``min_labels`` (0 where it has none) and the exclusive label
    groups (label indices; none where it has none, or where a group names a label not in ``labels``)."""
    th = th or {}
    index = {lb: i for i, lb in enumerate(labels)}
    groups = [[index[lb] for lb in g] for g in th.get("groups", []) if all(lb in index for lb in g)]
    groups += [AtMostOne(index[lb] for lb in g) for g in th.get("at_most_one", []) if all(lb in index for lb in g)]
    return (np.array([float(th.get("thresholds", {}).get(lb, 0.5)) for lb in labels]),
            int(th.get("min_labels", 0)), groups)


def decide(s: np.ndarray, thresholds, min_labels: int = 0, groups=()) -> np.ndarray:
    """The labels predicted for scores ``s`` (``[N, L]``): each at or above its threshold; with ``min_labels``
    1 (calibrate's ``at_least_one``), an image with none gets its top-scoring label. In each exclusive group
    (label indices: every image has exactly one of them) the top-scoring label alone, whatever the thresholds; in an
    ``AtMostOne`` group the top-scoring label alone where it reaches its threshold."""
    s = np.asarray(s, dtype=np.float64).reshape(len(s), -1)
    pred = s >= np.asarray(thresholds, dtype=np.float64)
    if groups and len(s):
        rows = np.arange(len(s))
        t = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (s.shape[1],))
        for g in groups:
            at_most = isinstance(g, AtMostOne)
            g = np.asarray(g, dtype=int)
            top = g[np.argmax(s[:, g], axis=1)]
            pred[:, g] = False
            pred[rows, top] = s[rows, top] >= t[top] if at_most else True
    return fill_empty(pred, s) if min_labels > 0 else pred


def group_accuracy(y: np.ndarray, s: np.ndarray, labels: list[str], groups: list[list[str]]) -> list[dict]:
    """Per exclusive group (label names): the share of images whose top-scoring label of the group is their own,
    over the images that have one of the group's labels."""
    y, s = np.asarray(y) > 0, np.asarray(s, dtype=np.float64)
    index = {n: i for i, n in enumerate(labels)}
    out = []
    for g in groups:
        cols = np.asarray([index[n] for n in g if n in index], dtype=int)
        if len(cols) != len(g):
            continue
        has = y[:, cols].any(axis=1)
        hit = y[np.flatnonzero(has), cols[np.argmax(s[has][:, cols], axis=1)]] if has.any() else np.zeros(0, bool)
        out.append({"labels": list(g), "accuracy": float(hit.mean()) if len(hit) else None, "images": int(has.sum())})
    return out


def fill_empty(pred: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``pred`` with each image that has no label given its top-scoring one (a copy)."""
    pred = np.array(pred, dtype=bool)
    empty = ~pred.any(axis=1)
    if pred.shape[1] and empty.any():
        pred[np.flatnonzero(empty), np.asarray(s)[empty].argmax(axis=1)] = True
    return pred


def compute(y: np.ndarray, s: np.ndarray, thresholds, labels: list[str], min_labels: int = 0, groups=()) -> dict:
    """All headline and per-label metrics for true flags ``y`` and scores ``s`` at ``thresholds`` (and
    ``min_labels`` and ``groups``, see ``decide``).

    numpy throughout, the values of sklearn's functions (``precision_recall_fscore_support``
    and ``f1_score`` with ``zero_division=0``, ``hamming_loss``, ``accuracy_score``,
    ``roc_auc_score``; tests/unit/test_metrics.py compares them).
    """
    y = np.asarray(y).astype(int).reshape(len(y), -1)
    s = np.asarray(s, dtype=np.float64).reshape(len(s), -1)
    pred = decide(s, thresholds, min_labels, groups).astype(int)
    ap = average_precisions(y, s)
    pos, hit = y > 0, pred > 0
    tp = (pos & hit).sum(axis=0)
    fp = (~pos & hit).sum(axis=0)
    fn = (pos & ~hit).sum(axis=0)
    tn = (~pos & ~hit).sum(axis=0)

    def ratio(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.divide(a, b, out=np.zeros_like(a), where=b != 0)

    p, r, f1 = ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(2 * tp, 2 * tp + fp + fn)
    aucs = [roc_auc(y[:, j], s[:, j]) for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    hl = float(np.mean(y != pred)) if y.size else 0.0
    per_label = {}
    for j, name in enumerate(labels):
        per_label[name] = {
            "ap": None if np.isnan(ap[j]) else float(ap[j]),
            "precision": float(p[j]), "recall": float(r[j]), "f1": float(f1[j]), "support": int(tp[j] + fn[j]),
            "tp": int(tp[j]), "fp": int(fp[j]), "fn": int(fn[j]), "tn": int(tn[j]),
        }
    micro = 2 * tp.sum() + fp.sum() + fn.sum()
    return {
        "map": float(np.nanmean(ap)) if np.isfinite(ap).any() else None,
        "micro_f1": float(2 * tp.sum() / micro) if micro else 0.0,
        "macro_f1": float(np.mean(f1)) if len(f1) else 0.0,
        "hamming_loss": hl,
        "label_accuracy": 1.0 - hl,
        "subset_accuracy": float(np.mean(np.all(y == pred, axis=1))) if len(y) else 0.0,
        "roc_auc_macro": float(np.mean(aucs)) if aucs else None,
        "n_images": int(len(y)),
        "per_label": per_label,
    }


def bootstrap_ci(y: np.ndarray, s: np.ndarray, thresholds, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Percentile intervals for mAP and micro F1 over ``n`` resamples of the images (``resample_weights``): the
    labels averaged are those with a positive in ``y``, in every resample as in the point estimate."""
    y = np.asarray(y).astype(int)
    s = np.asarray(s, dtype=np.float64)
    if n <= 0 or len(y) < 2:
        return {}
    pred = (s >= np.asarray(thresholds, dtype=np.float64)).astype(int)
    rng = np.random.default_rng(seed)
    ranked = Ranked(y, s)
    scored = (y > 0).any(axis=0)
    maps, f1s = [], []
    for _ in range(n):
        w = resample_weights(rng, len(y))
        if scored.any():
            maps.append(float(np.mean(ranked.average_precisions(w)[scored])))
        f1s.append(_micro_f1(y, pred, w))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {
        "map": [float(np.percentile(maps, lo)), float(np.percentile(maps, hi))] if maps else None,
        "micro_f1": [float(np.percentile(f1s, lo)), float(np.percentile(f1s, hi))],
        "n_resamples": n, "seed": seed, "level": level, "resampling": "bayesian",
    }


def paired_bootstrap(y: np.ndarray, s_a: np.ndarray, s_b: np.ndarray, pred_a: np.ndarray | None = None,
                     pred_b: np.ndarray | None = None, n: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Model ``a`` against model ``b`` on the same images: each resample weighs the images once for both
    (``resample_weights``), so what the two share (hard images, easy ones) cancels out of the difference; the
    labels averaged are those with a positive in ``y``, in every resample.

    Returns ``{"map": [d, lo, hi], "micro_f1": [d, lo, hi] or None, "per_label": [[d, lo, hi] or None, ...]}``:
    each difference ``a - b`` on all images, with its ``level`` percentile interval over ``n`` resamples.
    """
    y = np.asarray(y).astype(int)
    s_a, s_b = np.asarray(s_a, np.float64), np.asarray(s_b, np.float64)
    rng = np.random.default_rng(seed)
    k = y.shape[1]
    d_ap = np.full((n, k), np.nan)
    d_f1 = np.full(n, np.nan)
    ranked_a, ranked_b = Ranked(y, s_a), Ranked(y, s_b)
    for i in range(n):
        w = resample_weights(rng, len(y))  # the same weights for both: the pairing
        d_ap[i] = ranked_a.average_precisions(w) - ranked_b.average_precisions(w)
        if pred_a is not None and pred_b is not None:
            d_f1[i] = _micro_f1(y, pred_a, w) - _micro_f1(y, pred_b, w)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100

    def interval(point: float, draws: np.ndarray):
        draws = draws[np.isfinite(draws)]
        if not np.isfinite(point) or len(draws) == 0:
            return None
        return [float(point), float(np.percentile(draws, lo)), float(np.percentile(draws, hi))]

    ap_a, ap_b = average_precisions(y, s_a), average_precisions(y, s_b)
    with np.errstate(invalid="ignore"):
        d_map_draws = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in d_ap])
    f1 = None
    if pred_a is not None and pred_b is not None:
        f1 = interval(_micro_f1(y, pred_a) - _micro_f1(y, pred_b), d_f1)
    d_map = float(np.nanmean(ap_a - ap_b)) if np.isfinite(ap_a - ap_b).any() else float("nan")
    return {"map": interval(d_map, d_map_draws), "micro_f1": f1,
            "per_label": [interval(float(a - b), d_ap[:, j]) for j, (a, b) in enumerate(zip(ap_a, ap_b))],
            "n_resamples": n, "seed": seed, "level": level, "resampling": "bayesian"}


def baselines(y_test: np.ndarray, y_train: np.ndarray, labels: list[str]) -> dict:
    """Headline metrics of the all-negative and the label-prior predictors on the test labels."""
    y_test = np.asarray(y_test).astype(int)
    prior = np.asarray(y_train, dtype=np.float64).mean(axis=0) if len(y_train) else np.zeros(y_test.shape[1])
    out = {}
    for name, scores in (("all_negative", np.zeros(y_test.shape, np.float64)),
                         ("label_prior", np.tile(prior, (len(y_test), 1)))):
        m = compute(y_test, scores, 0.5, labels)
        m.pop("per_label")
        out[name] = m
    return out
