"""Multi-label metrics that a reader can trust, with bootstrap intervals and baselines."""

from __future__ import annotations

import numpy as np


def average_precisions(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Per-label average precision; NaN for a label with no positives."""
    from sklearn.metrics import average_precision_score

    out = np.full(y.shape[1], np.nan)
    for j in range(y.shape[1]):
        if y[:, j].sum() > 0:
            out[j] = average_precision_score(y[:, j], s[:, j])
    return out


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
    from sklearn.metrics import f1_score

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
        f1s.append(f1_score(y[idx], pred[idx], average="micro", zero_division=0))
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
