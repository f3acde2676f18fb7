"""Multi-label metrics that a reader can trust, with bootstrap intervals and baselines."""

from __future__ import annotations

import numpy as np


def average_precisions(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Per-label average precision; NaN for a label with no positives.

    The same value as ``sklearn.metrics.average_precision_score`` (one precision per distinct
    score, weighted by the recall it adds; ties count together), computed in numpy: the
    bootstrap calls it a thousand times, where sklearn's input checks cost a millisecond each.
    """
    y = np.asarray(y)
    s = np.asarray(s, dtype=np.float64)
    out = np.full(y.shape[1], np.nan)
    for j in range(y.shape[1]):
        out[j] = _average_precision(y[:, j], s[:, j])
    return out


def _average_precision(y: np.ndarray, s: np.ndarray) -> float:
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order] > 0, s[order]
    positives = int(ys.sum())
    if positives == 0:
        return float("nan")
    last = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]  # the last index of each distinct score
    tps = np.cumsum(ys)[last]
    precision = tps / (last + 1)
    recall_gain = np.diff(np.r_[0, tps]) / positives
    return float(np.sum(recall_gain * precision))


def _micro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = int(np.sum((y > 0) & (pred > 0)))
    denominator = int(np.sum(y > 0)) + int(np.sum(pred > 0))
    return 2.0 * tp / denominator if denominator else 0.0


def compute(y: np.ndarray, s: np.ndarray, thresholds, labels: list[str]) -> dict:
    """All headline and per-label metrics for true flags ``y`` and scores ``s`` at ``thresholds``."""
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        hamming_loss,
        multilabel_confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    y = np.asarray(y).astype(int)
    s = np.asarray(s, dtype=np.float64)
    pred = (s >= np.asarray(thresholds, dtype=np.float64)).astype(int)
    ap = average_precisions(y, s)
    p, r, f1, support = precision_recall_fscore_support(y, pred, average=None, zero_division=0, labels=range(y.shape[1]))
    aucs = []
    for j in range(y.shape[1]):
        if 0 < y[:, j].sum() < len(y):
            aucs.append(roc_auc_score(y[:, j], s[:, j]))
    hl = float(hamming_loss(y, pred))
    confusion = multilabel_confusion_matrix(y, pred, labels=range(y.shape[1]))  # [label, [[tn, fp], [fn, tp]]]
    per_label = {}
    for j, name in enumerate(labels):
        (tn, fp), (fn, tp) = confusion[j].tolist()
        per_label[name] = {
            "ap": None if np.isnan(ap[j]) else float(ap[j]),
            "precision": float(p[j]), "recall": float(r[j]), "f1": float(f1[j]), "support": int(support[j]),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        }
    return {
        "map": float(np.nanmean(ap)) if np.isfinite(ap).any() else None,
        "micro_f1": float(f1_score(y, pred, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "hamming_loss": hl,
        "label_accuracy": 1.0 - hl,
        "subset_accuracy": float(accuracy_score(y, pred)),
        "roc_auc_macro": float(np.mean(aucs)) if aucs else None,
        "n_images": int(len(y)),
        "per_label": per_label,
    }


def bootstrap_ci(y: np.ndarray, s: np.ndarray, thresholds, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Percentile intervals for mAP and micro F1, resampling images with replacement."""
    y = np.asarray(y).astype(int)
    s = np.asarray(s, dtype=np.float64)
    if n <= 0 or len(y) < 2:
        return {}
    pred = (s >= np.asarray(thresholds, dtype=np.float64)).astype(int)
    rng = np.random.default_rng(seed)
    maps, f1s = [], []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        ap = average_precisions(y[idx], s[idx])
        if np.isfinite(ap).any():
            maps.append(np.nanmean(ap))
        f1s.append(_micro_f1(y[idx], pred[idx]))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {
        "map": [float(np.percentile(maps, lo)), float(np.percentile(maps, hi))] if maps else None,
        "micro_f1": [float(np.percentile(f1s, lo)), float(np.percentile(f1s, hi))],
        "n_resamples": n, "seed": seed, "level": level,
    }


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
