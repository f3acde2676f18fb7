"""calibrate: per-label decision thresholds from validation scores."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mltag import metrics as M
from mltag.common import MltagError, read_labels, write_json_atomic


def best_threshold(y: np.ndarray, s: np.ndarray, min_precision: float | None = None) -> float | None:
    """F1-optimal threshold, or with ``min_precision`` the lowest one reaching that precision.

    Returns None when no threshold qualifies.
    """
    from sklearn.metrics import precision_recall_curve

    p, r, t = precision_recall_curve(y, s)
    p, r = p[:-1], r[:-1]
    if min_precision is not None:
        ok = np.where(p >= min_precision)[0]
        return float(t[ok[0]]) if len(ok) else None
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    i = int(np.argmax(f1))
    # Midway to the next lower score keeps the same decisions on val but is less brittle.
    lower = s[s < t[i]]
    return float((t[i] + lower.max()) / 2) if len(lower) else float(t[i])


def fit_thresholds(y: np.ndarray, s: np.ndarray, labels: list[str], min_precision: float | None = None,
                   min_positives: int = 5) -> dict:
    """Per-label thresholds; labels with fewer than ``min_positives`` positives use one global threshold."""
    y = np.asarray(y).astype(int)
    global_t = best_threshold(y.reshape(-1), s.reshape(-1), min_precision) if y.sum() else None
    global_t = 0.5 if global_t is None else global_t
    out, fallback = {}, []
    for j, name in enumerate(labels):
        t = None
        if y[:, j].sum() >= min_positives and y[:, j].sum() < len(y):
            t = best_threshold(y[:, j], s[:, j], min_precision)
        if t is None:
            fallback.append(name)
            t = global_t
        out[name] = t
    return {"labels": labels, "thresholds": out, "global_threshold": global_t, "fallback_labels": fallback,
            "method": "min_precision" if min_precision is not None else "f1", "min_precision": min_precision,
            "min_positives": min_positives}


def calibrate(evaluation: str | os.PathLike, model_dir: str | os.PathLike, out: str | os.PathLike,
              metrics_file: str | os.PathLike, method: str = "f1", min_precision: float | None = None,
              min_positives: int = 5, tracking_uri: str | None = None, run_id: str | None = None) -> dict:
    """Fit thresholds on val scores, report test metrics at 0.5 and at the thresholds.

    Writes the thresholds JSON to ``out`` and the metrics to ``metrics_file``.
    """
    import mlflow

    from mltag import tracking

    if method not in ("f1", "min_precision"):
        raise MltagError(f"calibrate.method must be f1 or min_precision, got {method!r}")
    if method == "min_precision" and min_precision is None:
        raise MltagError("calibrate.method=min_precision needs calibrate.min_precision")
    f = Path(evaluation) / "scores.npz"
    if not f.is_file():
        raise MltagError("scores not found; run the evaluate step first", f)
    labels = read_labels(Path(model_dir) / "labels.txt")
    with np.load(f, allow_pickle=False) as z:
        s_va, y_va, s_te, y_te = z["val_scores"], z["val_labels"], z["test_scores"], z["test_labels"]
    th = fit_thresholds(y_va, s_va, labels, min_precision if method == "min_precision" else None, min_positives)
    t = np.array([th["thresholds"][n] for n in labels])
    at_05 = M.compute(y_te, s_te, 0.5, labels)
    at_cal = M.compute(y_te, s_te, t, labels)
    result = {
        "thresholds": th["thresholds"],
        "fallback_labels": th["fallback_labels"],
        "test_at_0.5": {k: v for k, v in at_05.items() if k != "per_label"},
        "test_at_thresholds": at_cal,
    }
    write_json_atomic(out, th)
    write_json_atomic(metrics_file, result)
    run_id = run_id or tracking.run_id_of(model_dir)
    if run_id:
        tracking.setup(tracking_uri)
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics({f"calibrated_test_{k}": v for k, v in at_cal.items() if isinstance(v, float)})
            mlflow.log_metrics({f"threshold_{n}": v for n, v in th["thresholds"].items()})
            mlflow.log_artifact(str(out), "calibrate")
    print(f"calibrate: thresholds {', '.join(f'{n}={v:.3f}' for n, v in th['thresholds'].items())}")
    print(f"calibrate: test micro F1 {at_05['micro_f1']:.4f} at 0.5 -> {at_cal['micro_f1']:.4f} calibrated; "
          f"macro F1 {at_05['macro_f1']:.4f} -> {at_cal['macro_f1']:.4f}")
    return result
