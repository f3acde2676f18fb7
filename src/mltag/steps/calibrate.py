"""calibrate: per-label decision thresholds from validation scores."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from mltag import config
from mltag import metrics as M
from mltag.data.formats import model_mode, write_oof, write_thresholds
from mltag.errors import MltagError
from mltag.files import write_json_atomic
from mltag.head.folds import assign_folds, out_of_fold_scores

log = logging.getLogger(__name__)


def best_threshold(y: np.ndarray, s: np.ndarray, min_precision: float | None = None) -> float | None:
    """F1-optimal threshold, or with ``min_precision`` the lowest one reaching that precision.

    Returns None when no threshold qualifies.
    """
    p, r, t = M.precision_recall_curve(y, s)
    p, r = p[:-1], r[:-1]
    if min_precision is not None:
        ok = np.where(p >= min_precision)[0]
        return float(t[ok[0]]) if len(ok) else None
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    i = int(np.argmax(f1))
    # Midway to the next lower score keeps the same decisions on val but is less brittle.
    lower = s[s < t[i]]
    return float((t[i] + lower.max()) / 2) if len(lower) else float(t[i])


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    tp = float((pred & (y == 1)).sum())
    denom = float(pred.sum() + (y == 1).sum())
    return 2 * tp / denom if denom else 0.0


def fit_thresholds(y: np.ndarray, s: np.ndarray, labels: list[str], min_precision: float | None = None,
                   min_positives: int = 5, shrink: float = 0.0) -> dict:
    """Per-label thresholds fitted on scores ``s``.

    Labels with fewer than ``min_positives`` positives use one global threshold; the others
    are pulled toward it by ``shrink`` pseudo-positives: ``t = (n t_label + shrink t_global) /
    (n + shrink)``, so a threshold resting on a handful of positives moves little.
    """
    y = np.asarray(y).astype(int)
    global_t = best_threshold(y.reshape(-1), s.reshape(-1), min_precision) if y.sum() else None
    global_t = 0.5 if global_t is None else global_t
    out, fallback = {}, []
    for j, name in enumerate(labels):
        t = None
        n_pos = int(y[:, j].sum())
        if n_pos >= min_positives and n_pos < len(y):
            t = best_threshold(y[:, j], s[:, j], min_precision)
        if t is None:
            fallback.append(name)
            t = global_t
        elif shrink > 0:
            t = (n_pos * t + shrink * global_t) / (n_pos + shrink)
        out[name] = float(t)
    return {"labels": labels, "thresholds": out, "global_threshold": float(global_t), "fallback_labels": fallback,
            "method": "min_precision" if min_precision is not None else "f1", "min_precision": min_precision,
            "min_positives": min_positives, "shrink": shrink}


def cross_validated_gain(y: np.ndarray, s: np.ndarray, folds: np.ndarray, labels: list[str], min_positives: int,
                         shrink: float, at_05: tuple[str, ...] = ()) -> tuple[np.ndarray, float]:
    """How much fitted thresholds beat 0.5 on data they were not fitted on.

    Thresholds are fitted on all folds but one of the (out-of-fold) scores and applied to
    the held-out fold, so the figure is free of the optimism of scoring a threshold on the
    scores that chose it. Labels in ``at_05`` stay at 0.5.

    Returns:
        ``(per-label F1 gain, micro F1 gain)``, each pooled over the held-out folds.
    """
    y = np.asarray(y).astype(int)
    pred_t = cross_fitted_decisions(y, s, folds, labels, min_positives, shrink, at_05)
    pred_05 = s >= 0.5
    per_label = np.array([_f1(y[:, j], pred_t[:, j]) - _f1(y[:, j], pred_05[:, j]) for j in range(y.shape[1])])
    return per_label, _f1(y, pred_t) - _f1(y, pred_05)


def cross_fitted_decisions(y: np.ndarray, s: np.ndarray, folds: np.ndarray, labels: list[str], min_positives: int,
                           shrink: float, at_05: tuple[str, ...] = ()) -> np.ndarray:
    """Each image's labels at thresholds fitted on the other folds (labels in ``at_05`` at 0.5)."""
    pred = np.zeros(np.shape(y), dtype=bool)
    for f in np.unique(folds):
        fit, held = folds != f, folds == f
        th = fit_thresholds(y[fit], s[fit], labels, None, min_positives, shrink)
        t = np.array([0.5 if n in at_05 else th["thresholds"][n] for n in labels])
        pred[held] = s[held] >= t
    return pred


def choose_at_least_one(y: np.ndarray, s: np.ndarray, folds: np.ndarray, th: dict, setting: str,
                        cross_fitted: bool) -> tuple[int, float]:
    """Whether an image with no label at its thresholds gets its top-scoring one (``min_labels`` 1).

    ``auto`` turns it on when it raises micro F1 on the fitting scores, judged on decisions the
    thresholds were not fitted on where ``cross_fitted`` (thresholds fitted on the other folds,
    0.5 kept where calibrate keeps it). The rule fits nothing, so any gain counts. ``auto`` leaves it
    off for a precision target (it lowers precision) and for ``method: none`` (0.5 and nothing else);
    ``true`` and ``false`` decide.

    Returns:
        ``(min_labels, micro F1 gain of the rule on the fitting scores)``.
    """
    y = np.asarray(y).astype(int)
    labels = th["labels"]
    t = np.array([th["thresholds"][n] for n in labels])
    if cross_fitted and th["method"] == "f1" and len(th["kept_0.5"]) < len(labels):
        pred = cross_fitted_decisions(y, s, folds, labels, th["min_positives"], th["shrink"], tuple(th["kept_0.5"]))
    else:
        pred = s >= t
    gain = _f1(y, M.fill_empty(pred, s)) - _f1(y, pred) if len(y) else 0.0
    if setting == "auto":
        return (1 if gain > 0 and th["method"] == "f1" else 0), float(gain)
    return (1 if setting == "true" else 0), float(gain)


def choose_thresholds(y: np.ndarray, s: np.ndarray, folds: np.ndarray, labels: list[str],
                      min_precision: float | None = None, min_positives: int = 5, shrink: float = 10.0,
                      min_gain: float = 0.01) -> dict:
    """Thresholds fitted on scores ``s`` (out-of-fold ones, ideally), with the keep-0.5 rule.

    For an F1 target each label is decided on its own evidence: it leaves 0.5 only when its fitted
    threshold beats 0.5 by more than ``min_gain`` F1 on folds it was not fitted on
    (``cross_validated_gain``). A label is not held back because other labels gain nothing (five near-perfect
    labels used to dilute a whole-set check, so a colour label that gained 0.06 F1 kept 0.5). Only when the
    thresholds that leave 0.5 make the whole set worse than 0.5 by more than ``min_gain`` micro F1 (out of
    fold) do they all go back. For a precision target every fitted threshold is kept: reaching the
    precision is the point. ``rule`` says, per label, which rule set or kept its threshold.

    Returns:
        The ``fit_thresholds`` dict plus ``kept_0.5``, ``rule`` and ``expected`` (the cross-validated
        micro and per-label F1 gains over 0.5 of the thresholds shipped).
    """
    y = np.asarray(y).astype(int)
    th = fit_thresholds(y, s, labels, min_precision, min_positives, shrink)
    enough = len(y) >= 10 and len(np.unique(folds)) > 1
    gain_l, gain_micro = cross_validated_gain(y, s, folds, labels, min_positives, shrink) if enough \
        else (np.zeros(len(labels)), 0.0)
    fallback = set(th["fallback_labels"])
    rule = {n: ("global threshold" if n in fallback else "fitted") + (f" (out of fold {gain_l[j]:+.3f} F1)"
            if enough else "") for j, n in enumerate(labels)}
    kept = []
    if min_precision is None:
        kept = [n for j, n in enumerate(labels) if not gain_l[j] > min_gain]
        for j, name in enumerate(labels):
            if name in kept:
                th["thresholds"][name] = 0.5
                rule[name] = (f"0.5 kept (out of fold {gain_l[j]:+.3f} F1, not above calibrate.min_gain {min_gain})"
                              if enough else "0.5 kept (too few scores to judge a threshold)")
        if kept and enough:
            _, gain_micro = cross_validated_gain(y, s, folds, labels, min_positives, shrink, tuple(kept))
        elif kept:
            gain_micro = 0.0
        if gain_micro < -min_gain and len(kept) < len(labels):  # the set as a whole worse than 0.5: all back
            for name in labels:
                if name not in kept:
                    rule[name] = f"0.5 kept (together the fitted thresholds lost {gain_micro:+.3f} micro F1)"
                th["thresholds"][name] = 0.5
            kept = list(labels)
            gain_micro = 0.0
    th["rule"] = rule
    th["kept_0.5"] = kept
    th["expected"] = {"micro_f1_gain": float(gain_micro),
                      "per_label_f1_gain": {n: float(g) for n, g in zip(labels, gain_l)}}
    return th


def _oof_for_review(oof_out, bottlenecks, model_dir, cv_folds: int, labels: list[str], progress: bool):
    """Every train+val image's out-of-fold scores, for review (``oof_out``): computed with ``cv_folds`` folds,
    or 5 when thresholds do not use them. A dataset too small for folds gets an empty file that says why.

    Returns:
        ``(out_of_fold_scores' result or None, the arguments of write_oof or None)``.
    """
    if oof_out is None:
        return None, None
    if bottlenecks is None:
        raise MltagError("out-of-fold scores for review need the bottleneck folder (--bottlenecks)")
    try:
        oof = out_of_fold_scores(bottlenecks, model_dir, max(cv_folds, 2) if cv_folds > 1 else 5, progress)
        return oof, (oof_out, oof[3], oof[0], oof[1], oof[2], labels)
    except MltagError as e:
        if "needs at least" not in str(e) and "no head settings" not in str(e):
            raise
        log.warning("calibrate: no out-of-fold scores for review: %s", e)
        return None, (oof_out, [], np.zeros((0, len(labels))), np.zeros((0, len(labels))), np.zeros(0), labels, str(e))


def _untuned(labels: list[str], min_positives: int, shrink: float) -> dict:
    """``method: none``: 0.5 for every label, in the same shape as fitted thresholds."""
    return {"labels": labels, "thresholds": {n: 0.5 for n in labels}, "global_threshold": 0.5,
            "fallback_labels": [], "method": "none", "min_precision": None, "min_positives": min_positives,
            "shrink": shrink, "kept_0.5": list(labels),
            "expected": {"micro_f1_gain": 0.0, "per_label_f1_gain": {n: 0.0 for n in labels}}}


def _evaluated_scores(evaluation, labels: list[str], model_dir):
    """evaluate's ``(val scores, val labels, test scores, test labels)``, checked against the model: the one its
    report names (by content hash), and its labels."""
    import json

    from mltag.data.formats import load_scores
    from mltag.data.integrity import recorded_digest

    details = Path(evaluation) / "details.json"
    try:
        evaluated = json.loads(details.read_text(encoding="utf-8")).get("model_digest")
    except (OSError, ValueError, AttributeError):
        evaluated = None  # an evaluation without its report: the columns are still checked below
    ours = recorded_digest(model_dir)
    if evaluated and ours and evaluated != ours:
        raise MltagError(f"this evaluation is of another model (content hash {evaluated[:12]}..., this model's "
                         f"{ours[:12]}...): run evaluate on {model_dir}, then calibrate", details)

    sc = load_scores(evaluation)
    s_va, y_va, s_te, y_te = sc["val_scores"], sc["val_labels"], sc["test_scores"], sc["test_labels"]
    for name, a in (("val_scores", s_va), ("test_scores", s_te)):
        if a.ndim != 2 or a.shape[1] != len(labels):
            raise MltagError(f"{name} has {a.shape[-1] if a.ndim else 0} columns but the model has {len(labels)} "
                             "labels; run evaluate again for this model", Path(evaluation) / "scores.npz")
    return s_va, y_va, s_te, y_te


def _fitting_scores(calibrate: config.Calibrate, model_dir, bottlenecks, oof_out, labels: list[str],
                    y_va: np.ndarray, s_va: np.ndarray, progress: bool):
    """What the thresholds are fitted on: out-of-fold scores over train+val (``cv_folds`` > 1), else the
    validation scores. Returns ``(oof to write for review or None, y, scores, folds, where they come from,
    the folds used)``."""
    method, cv_folds = calibrate.method, calibrate.cv_folds
    if cv_folds > 1 and method != "none" and model_mode(model_dir) == "fine_tune":
        log.info("calibrate: fine-tuned backbone: the cached vectors do not match it, so thresholds come from "
                 "the validation scores (no out-of-fold refits)")
        cv_folds = 0
    oof, oof_file = _oof_for_review(oof_out, bottlenecks, model_dir, cv_folds, labels, progress)
    if cv_folds > 1 and method != "none":
        if bottlenecks is None:
            raise MltagError("calibrate.cv_folds > 1 needs the bottleneck folder (--bottlenecks)")
        y_fit, s_fit, folds, _ = oof if oof is not None else out_of_fold_scores(bottlenecks, model_dir, cv_folds,
                                                                                 progress)
        source = f"out-of-fold scores of {len(y_fit)} train+val images ({cv_folds} folds)"
    else:
        y_fit, s_fit = y_va, s_va
        folds = assign_folds(range(len(y_va)), 5)
        source = f"scores of {len(y_va)} validation images"
    return oof_file, y_fit, s_fit, folds, source, cv_folds


def _exclusive_groups(th: dict, model_dir, y_fit, s_fit, t, labels: list[str]) -> list:
    """The model's exclusive label groups (prepare found or was given them; ``model.json``), recorded in ``th``
    (``groups``, each label's ``rule``, the micro F1 gain on the fitting scores) so that every consumer of
    thresholds.json predicts the top-scoring label of each; their label indices."""
    from mltag.data.formats import read_model_meta
    from mltag.data.groups import at_most_one, describe, exactly_one

    recorded = read_model_meta(model_dir, verify=False).get("label_groups") or []
    known = set(labels)
    exact = [g for g in exactly_one(recorded) if set(g) <= known]
    at_most = [g for g in at_most_one(recorded) if set(g) <= known]
    if exact:
        th["groups"] = exact
    if at_most:
        th["at_most_one"] = at_most
    _, _, groups = M.decision_rule(th, labels)
    if groups:
        rules = th.setdefault("rule", {})
        for g in exact:
            for n in g:
                rules[n] = "exclusive group: its top-scoring label"
        for g in at_most:
            for n in g:
                rules[n] = f"at most one of its group: the top-scoring label if over {th['thresholds'][n]:.3f}; " + \
                    rules.get(n, "")
        gain = M.compute(y_fit, s_fit, t, labels, th["min_labels"], groups)["micro_f1"] - \
            M.compute(y_fit, s_fit, t, labels, th["min_labels"])["micro_f1"]
        th["expected"]["groups_micro_f1_gain"] = gain
        log.info("calibrate: exclusive label groups (every image has exactly one%s): %s; each predicts its "
                 "top-scoring label (%+.4f micro F1 on the fitting scores)", ", or at most one" if at_most else "",
                 describe([*exact, *({"at_most_one": g} for g in at_most)]), gain)
    return groups


def _result(th: dict, source: str, one_gain: float, at_05: dict, at_cal: dict) -> dict:
    """calibrate's whole result (``--report``): the thresholds, what they promise and what test says."""
    return {
        "thresholds": th["thresholds"],
        "fallback_labels": th["fallback_labels"],
        "kept_0.5": th["kept_0.5"],
        "rule": th.get("rule", {}),
        "at_least_one": bool(th["min_labels"]),
        "groups": th.get("groups", []),
        "at_most_one": th.get("at_most_one", []),
        "fitted_on": source,
        "expected_micro_f1_gain": th["expected"]["micro_f1_gain"],
        "expected_at_least_one_micro_f1_gain": one_gain,
        "test_micro_f1_gain": at_cal["micro_f1"] - at_05["micro_f1"],
        "test_at_0.5": {k: v for k, v in at_05.items() if k != "per_label"},
        "test_at_thresholds": at_cal,
    }


def _say(th: dict, source: str, one_gain: float, expected: dict, at_05: dict, at_cal: dict) -> None:
    rules = th.get("rule", {})
    log.info("calibrate: thresholds %s (from %s); an image with no label gets its top one: %s "
             "(%+.4f micro F1 on the fitting scores)",
             ", ".join(f"{n}={v:.3f} [{rules.get(n, '')}]" for n, v in th["thresholds"].items()),
             source, "yes" if th["min_labels"] else "no", one_gain)
    log.info("calibrate: expected micro F1 gain %+.4f; test micro F1 %.4f at 0.5 -> %.4f calibrated; "
             "macro F1 %.4f -> %.4f", expected["micro_f1_gain"], at_05["micro_f1"], at_cal["micro_f1"],
             at_05["macro_f1"], at_cal["macro_f1"])


def calibrate(evaluation: str | os.PathLike, model_dir: str | os.PathLike, out: str | os.PathLike,
              metrics_file: str | os.PathLike, *, calibrate: config.Calibrate,
              bottlenecks: str | os.PathLike | None = None, progress: bool = True,
              config: dict | None = None, oof_out: str | os.PathLike | None = None,
              report: str | os.PathLike | None = None) -> dict:
    """Fit per-label thresholds; report test metrics at 0.5 and at the thresholds.

    ``calibrate`` is the typed params section. With ``cv_folds`` > 1 (and ``bottlenecks``), thresholds come from out-of-fold scores over
    train+val: the head is refitted ``cv_folds`` times on cached vectors, so every image is
    scored by a head that never saw it. With ``cv_folds`` 0 they come from the validation
    scores alone (small validation sets overfit). ``method: none`` ships 0.5 everywhere.

    A label keeps 0.5 unless its fitted threshold beats 0.5 by more than ``min_gain`` F1 on
    folds it was not fitted on, so calibration does not make a model worse on average.

    Writes the thresholds JSON to ``out``, the headline figures to ``metrics_file`` (calibrated micro and
    macro F1 on test, how many labels left 0.5) and, with ``report``, every figure
    (per label, both decision rules) there; with
    ``oof_out``, every train+val image's out-of-fold scores for review (computed with
    ``cv_folds`` folds, or 5 when thresholds do not use them). The report also keeps the figures for the
    model's MLflow run (``tracking.runs.for_the_run``): register logs them there, with the thresholds.
    """
    from mltag.tracking.runs import RUN_LOG_KEY, for_the_run

    method, min_precision, min_positives = calibrate.method, calibrate.min_precision, calibrate.min_positives
    cv_folds, shrink, min_gain = calibrate.cv_folds, calibrate.shrink, calibrate.min_gain
    from mltag.data.formats import read_model_meta

    model_meta = read_model_meta(model_dir)
    labels = model_meta["labels"]
    if (model_meta.get("head") or {}).get("refit") and method != "none" and cv_folds <= 1:
        raise MltagError("this head was refitted on train+val (train.refit), so its validation scores are not held "
                         "out and cannot fit thresholds: set calibrate.cv_folds to 2 or more (the default 5), or "
                         "train.refit false", Path(model_dir) / "model.json")
    if bottlenecks is not None:  # first: a reordered label list says so, not only that the model changed
        from mltag.data.formats import check_same_labels, read_labels

        check_same_labels(read_labels(Path(bottlenecks) / "labels.txt"), labels, Path(model_dir) / "model.json",
                          "the model", "calibrate the model trained on these bottlenecks (or restore its folder)")
    s_va, y_va, s_te, y_te = _evaluated_scores(evaluation, labels, model_dir)
    mp = min_precision if method == "min_precision" else None
    oof_file, y_fit, s_fit, folds, source, cv_folds = _fitting_scores(
        calibrate, model_dir, bottlenecks, oof_out, labels, y_va, s_va, progress)
    th = _untuned(labels, min_positives, shrink) if method == "none" else \
        choose_thresholds(y_fit, s_fit, folds, labels, mp, min_positives, shrink, min_gain)
    kept, expected = th["kept_0.5"], th["expected"]
    th["fitted_on"] = source
    th["min_labels"], one_gain = choose_at_least_one(y_fit, s_fit, folds, th, calibrate.at_least_one,
                                                     cv_folds > 1 and method != "none")
    expected["at_least_one_micro_f1_gain"] = one_gain
    t = np.array([th["thresholds"][n] for n in labels])
    groups = _exclusive_groups(th, model_dir, y_fit, s_fit, t, labels)
    at_05 = M.compute(y_te, s_te, 0.5, labels)
    at_cal = M.compute(y_te, s_te, t, labels, th["min_labels"], groups)
    if groups:  # per group: the share of test images whose top-scoring label of the group is their own
        at_cal["group_accuracy"] = M.group_accuracy(y_te, s_te, labels, th.get("groups", []))
    result = _result(th, source, one_gain, at_05, at_cal)
    th["config"] = config
    if oof_file is not None:
        write_oof(*oof_file)
    write_thresholds(out, th)
    if report is not None:
        write_json_atomic(report, {**result, RUN_LOG_KEY: for_the_run({
            **{f"calibrated_test_{k}": v for k, v in at_cal.items() if isinstance(v, float)},
            **{f"threshold_{n}": v for n, v in th["thresholds"].items()},
            "calibrate_expected_micro_f1_gain": expected["micro_f1_gain"],
            "calibrate_at_least_one": float(th["min_labels"])}, {Path(report).name: "calibrate"})})
    write_json_atomic(metrics_file, {  # micro F1 at 0.5 is evaluate's
        "micro_f1": at_cal["micro_f1"], "macro_f1": at_cal["macro_f1"], "labels_tuned": len(labels) - len(kept)})
    _say(th, source, one_gain, expected, at_05, at_cal)
    return result
