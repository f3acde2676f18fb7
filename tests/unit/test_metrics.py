"""Metrics against hand-computed values, bootstrap intervals, thresholds and the promotion gate."""

from __future__ import annotations

import numpy as np
import pytest

from mltag import metrics as M
from mltag.registry.gate import gate
from mltag.steps.calibrate import best_threshold, fit_thresholds


def test_metrics_match_hand_computed_values():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    s = np.array([[0.9, 0.2], [0.4, 0.8], [0.3, 0.6], [0.1, 0.7]])
    m = M.compute(y, s, 0.5, ["a", "b"])
    # Label a: ranking 0.9(+) 0.4(-) 0.3(+) 0.1(-): AP = (1/1 + 2/3) / 2.
    assert m["per_label"]["a"]["ap"] == pytest.approx((1 + 2 / 3) / 2)
    # Label b: ranking 0.8(+) 0.7(-) 0.6(+) 0.2(-): AP = (1 + 2/3) / 2 as well.
    assert m["map"] == pytest.approx((1 + 2 / 3) / 2)
    # Predictions at 0.5: a = [1,0,0,0], b = [0,1,1,1].
    a, b = m["per_label"]["a"], m["per_label"]["b"]
    assert (a["tp"], a["fp"], a["fn"], a["tn"]) == (1, 0, 1, 2)
    assert (b["tp"], b["fp"], b["fn"], b["tn"]) == (2, 1, 0, 1)
    assert a["precision"] == 1.0 and a["recall"] == 0.5 and a["f1"] == pytest.approx(2 / 3)
    assert b["precision"] == pytest.approx(2 / 3) and b["recall"] == 1.0 and b["f1"] == pytest.approx(0.8)
    # micro: tp 3, fp 1, fn 1 -> P = R = 3/4, F1 = 0.75; macro = (2/3 + 0.8) / 2.
    assert m["micro_f1"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["hamming_loss"] == pytest.approx(2 / 8) and m["label_accuracy"] == pytest.approx(6 / 8)
    assert m["subset_accuracy"] == pytest.approx(2 / 4)  # rows 0 and 1 are exactly right
    assert m["roc_auc_macro"] == pytest.approx(0.75)


def test_all_negative_baseline_shows_what_label_accuracy_is_worth():
    rng = np.random.default_rng(0)
    y_test = (rng.random((200, 5)) < 0.1).astype(int)
    b = M.baselines(y_test, y_test, [str(i) for i in range(5)])
    assert b["all_negative"]["micro_f1"] == 0.0
    assert b["all_negative"]["label_accuracy"] == pytest.approx(1 - y_test.mean())
    assert b["all_negative"]["label_accuracy"] > 0.85  # "high accuracy", useless model
    assert b["label_prior"]["map"] == pytest.approx(y_test.mean(0).mean(), abs=1e-9)


def test_bootstrap_interval_contains_estimate_and_narrows_with_more_data():
    rng = np.random.default_rng(1)

    def sample(n):
        y = (rng.random((n, 3)) < 0.4).astype(int)
        s = np.clip(y * 0.3 + rng.random((n, 3)) * 0.7, 0, 1)
        return y, s

    widths = []
    for n in (40, 800):
        y, s = sample(n)
        point = M.compute(y, s, 0.5, ["a", "b", "c"])
        ci = M.bootstrap_ci(y, s, 0.5, n=300, seed=0)
        assert ci["map"][0] <= point["map"] <= ci["map"][1]
        assert ci["micro_f1"][0] <= point["micro_f1"] <= ci["micro_f1"][1]
        widths.append(ci["map"][1] - ci["map"][0])
    assert widths[1] < widths[0] / 2
    y, s = sample(50)
    assert M.bootstrap_ci(y, s, 0.5, n=100, seed=3) == M.bootstrap_ci(y, s, 0.5, n=100, seed=3)


def test_f1_and_precision_thresholds():
    y = np.array([0, 0, 1, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.8, 0.9])
    t = best_threshold(y, s)
    assert 0.2 < t <= 0.3  # F1-optimal keeps all three positives (F1 = 6/7)
    assert 0.4 < best_threshold(y, s, min_precision=1.0) <= 0.8
    assert best_threshold(np.array([0, 1]), np.array([0.9, 0.1]), min_precision=1.0) is None


def test_labels_with_few_positives_fall_back_to_the_global_threshold():
    rng = np.random.default_rng(2)
    y = np.zeros((60, 3), int)
    y[:30, 0] = 1
    y[::2, 1] = 1
    y[:2, 2] = 1  # only two positives
    s = np.clip(y * 0.5 + rng.random(y.shape) * 0.5, 0, 1)
    th = fit_thresholds(y, s, ["a", "b", "c"], min_positives=5)
    assert th["fallback_labels"] == ["c"]
    assert th["thresholds"]["c"] == th["global_threshold"]
    assert th["thresholds"]["a"] != th["global_threshold"] or th["thresholds"]["b"] != th["global_threshold"]


def test_gate_decisions():
    champ = np.array([0.90, 0.90, 0.90])
    ok, why = gate(np.array([0.95, 0.93, 0.91]), champ, list("abc"), margin=0.01, max_label_ap_drop=0.05)
    assert ok, why
    ok, why = gate(np.array([0.905, 0.90, 0.90]), champ, list("abc"), margin=0.01, max_label_ap_drop=0.05)
    assert not ok and "does not beat" in why
    ok, why = gate(np.array([1.0, 1.0, 0.80]), champ, list("abc"), margin=0.0, max_label_ap_drop=0.05)
    assert not ok and "label 'c' AP drops 0.1000" in why


def gap_scores(n: int, rng, labels: int = 5, noise: float = 0.2):
    """Scores where 0.5 is the best threshold: every score is on the right side of a gap at 0.45-0.55 with
    probability 1 - noise, and within a side a score says nothing more about the label."""
    y = (rng.random((n, labels)) < 0.3).astype(int)
    right = rng.random((n, labels)) >= noise
    high = np.where(right, y == 1, y == 0)
    s = np.where(high, rng.uniform(0.55, 1.0, (n, labels)), rng.uniform(0.0, 0.45, (n, labels)))
    return y, s


def test_cross_fitted_thresholds_do_not_overfit_where_validation_only_ones_do():
    from mltag.steps.calibrate import _f1, choose_thresholds

    names = list("abcde")
    losses_val, losses_cv = [], []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        y_val, s_val = gap_scores(40, rng)  # a small validation set, as in a real project
        y_oof, s_oof = gap_scores(400, rng)  # out-of-fold scores over train+val
        y_te, s_te = gap_scores(4000, rng)
        base = _f1(y_te, s_te >= 0.5)
        # The old way: per-label F1-optimal thresholds on validation alone, no shrinkage, no keep-0.5 rule.
        old = fit_thresholds(y_val, s_val, names, min_positives=5)
        t_old = np.array([old["thresholds"][n] for n in names])
        losses_val.append(base - _f1(y_te, s_te >= t_old))
        folds = np.arange(len(y_oof)) % 5
        new = choose_thresholds(y_oof, s_oof, folds, names)
        t_new = np.array([new["thresholds"][n] for n in names])
        losses_cv.append(base - _f1(y_te, s_te >= t_new))
        assert new["expected"]["micro_f1_gain"] <= 0.01
    assert np.mean(losses_val) > 0.01, losses_val
    assert np.mean(losses_cv) <= 0.005, losses_cv
    assert max(losses_cv) <= 0.01, losses_cv


def test_a_label_keeps_0_5_unless_its_threshold_beats_it_out_of_fold():
    from mltag.steps.calibrate import choose_thresholds

    rng = np.random.default_rng(0)
    y, s = gap_scores(600, rng, labels=2)
    # Label 'shifted': the model is systematically under-confident, so 0.25 separates far better than 0.5.
    s[:, 1] = np.where(y[:, 1] == 1, rng.uniform(0.3, 0.45, len(y)), rng.uniform(0.0, 0.2, len(y)))
    th = choose_thresholds(y, s, np.arange(len(y)) % 5, ["gap", "shifted"])
    assert th["kept_0.5"] == ["gap"] and th["thresholds"]["gap"] == 0.5
    assert 0.2 <= th["thresholds"]["shifted"] <= 0.3
    assert th["expected"]["per_label_f1_gain"]["shifted"] > 0.5
    assert th["expected"]["micro_f1_gain"] > 0.2


def _one_label_each(n, rng, labels=4, unlabelled=0.0):
    """Every image has one label (or, with probability ``unlabelled``, none), and the model ranks it first
    nearly always but is under-confident: its score is often under 0.5 while the others stay lower."""
    y = np.zeros((n, labels), int)
    y[np.arange(n), rng.integers(0, labels, n)] = 1
    y[rng.random(n) < unlabelled] = 0
    s = rng.uniform(0.0, 0.3, (n, labels))
    s[y == 1] = rng.uniform(0.25, 0.9, int(y.sum()))
    return y, s


def test_decide_gives_an_image_with_no_label_its_top_scoring_one():
    s = np.array([[0.2, 0.4, 0.1], [0.7, 0.2, 0.6], [0.1, 0.1, 0.3]])
    np.testing.assert_array_equal(M.decide(s, 0.5), [[0, 0, 0], [1, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(M.decide(s, 0.5, 1), [[0, 1, 0], [1, 0, 1], [0, 0, 1]])
    np.testing.assert_array_equal(M.decide(s, [0.5, 0.3, 0.5], 1), [[0, 1, 0], [1, 0, 1], [0, 0, 1]])
    assert M.compute(np.eye(3, dtype=int)[[1, 0, 2]], s, 0.5, list("abc"), 1)["micro_f1"] == pytest.approx(6 / 7)


def test_at_least_one_label_is_chosen_out_of_fold_and_pays_on_unseen_images():
    from mltag.steps.calibrate import choose_at_least_one, choose_thresholds

    rng = np.random.default_rng(3)
    names = list("abcd")
    y, s = _one_label_each(500, rng)
    folds = np.arange(len(y)) % 5
    th = choose_thresholds(y, s, folds, names)
    on, gain = choose_at_least_one(y, s, folds, th, "auto", cross_fitted=True)
    assert on == 1 and gain > 0.02
    t = np.array([th["thresholds"][n] for n in names])
    y_te, s_te = _one_label_each(4000, rng)
    assert M.compute(y_te, s_te, t, names, 1)["micro_f1"] > M.compute(y_te, s_te, t, names)["micro_f1"] + 0.02
    assert choose_at_least_one(y, s, folds, th, "false", cross_fitted=True)[0] == 0
    # Half the images have no label: giving them one adds false positives, so auto leaves the rule off.
    y2, s2 = _one_label_each(500, rng, unlabelled=0.6)
    th2 = choose_thresholds(y2, s2, folds, names)
    on2, gain2 = choose_at_least_one(y2, s2, folds, th2, "auto", cross_fitted=True)
    assert on2 == 0 and gain2 < 0
    assert choose_at_least_one(y2, s2, folds, th2, "true", cross_fitted=True)[0] == 1
    # A precision target is never traded away by auto.
    th3 = choose_thresholds(y, s, folds, names, min_precision=0.9)
    assert choose_at_least_one(y, s, folds, th3, "auto", cross_fitted=True)[0] == 0


def test_shrinkage_pulls_thresholds_of_rare_labels_toward_the_global_one():
    rng = np.random.default_rng(1)
    y, s = gap_scores(300, rng, labels=3)
    free = fit_thresholds(y, s, list("abc"), shrink=0.0)
    pulled = fit_thresholds(y, s, list("abc"), shrink=1000.0)
    for n in "abc":
        assert abs(pulled["thresholds"][n] - pulled["global_threshold"]) < \
            abs(free["thresholds"][n] - free["global_threshold"]) + 1e-9
        assert abs(pulled["thresholds"][n] - pulled["global_threshold"]) < 0.02


def test_error_report_escapes_names_and_shows_the_worst_mistakes(tmp_path):
    from PIL import Image

    from mltag.steps.evaluate import error_report_html, pr_curves_png

    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    s = np.array([[0.9, 0.2], [0.6, 0.8], [0.3, 0.6], [0.1, 0.7]])
    labels = ["<b>cat</b>", "dog & co"]
    paths = ["a.jpg", "b.jpg", "c.jpg", "broken.jpg"]
    for p in paths[:3]:
        Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / p)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    m = M.compute(y, s, 0.5, labels)
    page = error_report_html(y, s, 0.5, labels, paths, tmp_path, m, pr_curves_png(y, s, labels))
    assert "<b>cat</b>" not in page and "&lt;b&gt;cat&lt;/b&gt;" in page and "dog &amp; co" in page
    # cat: b.jpg is the false positive (0.6) and c.jpg the false negative (0.3); dog: broken.jpg is its FP.
    cat, dog = page.split("<h3>")[1:]
    assert cat.index("b.jpg") < cat.index("worst false negatives") < cat.index("c.jpg")
    assert "score 0.600" in cat and "score 0.300" in cat and cat.count("data:image/jpeg;base64,") == 2
    assert "broken.jpg" in dog and "(unreadable)" in dog
    per_label = page.split("<h2>Per label</h2>")[1].split("</table>")[0]
    tp, fp, fn, tn = (m["per_label"]["dog & co"][k] for k in ("tp", "fp", "fn", "tn"))
    assert (tp, fp, fn, tn) == (2, 1, 0, 1)
    assert f'<td class="num">{tp}</td>\n<td class="num">{fp}</td><td class="num">{fn}</td>' in per_label


def test_average_precision_and_micro_f1_match_sklearn_with_ties_and_empty_labels():
    """The numpy AP (a thousand bootstrap calls) is sklearn's AP, ties and all."""
    from sklearn.metrics import average_precision_score, f1_score

    from mltag.metrics import _micro_f1, average_precisions

    rng = np.random.default_rng(3)
    for trial in range(30):
        n = int(rng.integers(2, 60))
        y = (rng.random((n, 4)) < 0.3).astype(int)
        y[:, 3] = 0  # a label without positives: NaN, as before
        s = np.round(rng.random((n, 4)), int(rng.integers(1, 3)))  # coarse scores: many ties
        ours = average_precisions(y, s)
        for j in range(3):
            if y[:, j].any():
                assert abs(ours[j] - average_precision_score(y[:, j], s[:, j])) < 1e-12, (trial, j)
            else:
                assert np.isnan(ours[j])
        assert np.isnan(ours[3])
        pred = (s >= 0.5).astype(int)
        assert abs(_micro_f1(y, pred) - f1_score(y, pred, average="micro", zero_division=0)) < 1e-12


def test_metrics_compute_and_pr_curve_match_sklearn():
    """metrics.compute, precision_recall_curve and roc_auc (numpy: the steps no longer import sklearn)
    give sklearn's values, with ties, all-negative labels, no predicted positives and one image."""
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        hamming_loss,
        precision_recall_curve,
        precision_recall_fscore_support,
        roc_auc_score,
    )

    from mltag import metrics as M

    rng = np.random.default_rng(5)
    labels = ["a", "b", "c", "d"]
    for trial in range(40):
        n = int(rng.integers(1, 50))
        y = (rng.random((n, 4)) < 0.35).astype(int)
        y[:, 3] = 0
        s = np.round(rng.random((n, 4)), int(rng.integers(1, 3)))
        t = np.array([0.5, 0.3, 1.1, 0.5])  # label c: nothing predicted
        m = M.compute(y, s, t, labels)
        pred = (s >= t).astype(int)
        p, r, f1, support = precision_recall_fscore_support(y, pred, average=None, zero_division=0,
                                                            labels=range(4))
        for j, name in enumerate(labels):
            got = m["per_label"][name]
            assert (got["precision"], got["recall"], got["f1"], got["support"]) == \
                pytest.approx((p[j], r[j], f1[j], support[j]), abs=1e-12), (trial, name)
        assert m["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro", zero_division=0), abs=1e-12)
        assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
        assert m["hamming_loss"] == pytest.approx(hamming_loss(y, pred), abs=1e-12)
        assert m["subset_accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
        aucs = [roc_auc_score(y[:, j], s[:, j]) for j in range(4) if 0 < y[:, j].sum() < n]
        assert m["roc_auc_macro"] == (pytest.approx(np.mean(aucs), abs=1e-12) if aucs else None)
        for j in range(3):
            if y[:, j].any():
                for ours, theirs in zip(M.precision_recall_curve(y[:, j], s[:, j]),
                                        precision_recall_curve(y[:, j], s[:, j])):
                    np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_weighted_average_precision_and_micro_f1_match_sklearn_sample_weight():
    """A bootstrap resample is a weighting of the images: the weighted AP and micro F1 are sklearn's with
    ``sample_weight``, ties and all."""
    from sklearn.metrics import average_precision_score, f1_score

    from mltag.metrics import Ranked, _micro_f1, resample_weights

    rng = np.random.default_rng(5)
    for trial in range(30):
        n = int(rng.integers(2, 60))
        y = (rng.random((n, 3)) < 0.3).astype(int)
        s = np.round(rng.random((n, 3)), int(rng.integers(1, 3)))
        w = resample_weights(rng, n)
        assert abs(w.sum() - n) < 1e-9 and (w > 0).all()
        ours = Ranked(y, s).average_precisions(w)
        for j in range(3):
            if y[:, j].any():
                want = average_precision_score(y[:, j], s[:, j], sample_weight=w)
                assert abs(ours[j] - want) < 1e-9, (trial, j)
        pred = (s >= 0.5).astype(int)
        want = f1_score(y.ravel(), pred.ravel(), sample_weight=np.repeat(w, 3), zero_division=0)
        assert abs(_micro_f1(y, pred, w) - want) < 1e-9


def test_intervals_contain_their_own_estimate_with_many_rare_labels():
    """#51: with many labels of one test positive each and a weak model, a resample that dropped a label's
    positive averaged fewer labels, and one that drew it twice tied it with itself and raised its AP: evaluate
    printed mAP 0.017 [0.022, 0.032]. The labels averaged are now the same in every resample, and no image is
    copied: the interval holds its estimate, for evaluate's interval and for the gate's paired difference."""
    rng = np.random.default_rng(0)
    n, k = 300, 60
    y = np.zeros((n, k), int)
    for j in range(k):
        y[rng.choice(n, size=1, replace=False), j] = 1
    s = rng.random((n, k))  # no skill: each rare label's AP is small
    point = float(np.nanmean(M.average_precisions(y, s)))
    ci = M.bootstrap_ci(y, s, 0.5, n=300, seed=1)
    assert ci["map"][0] <= point <= ci["map"][1], (point, ci["map"])
    better = np.where(y == 1, np.clip(s + 0.3, 0, 1), s)  # the same images, a model with some skill
    paired = M.paired_bootstrap(y, better, s, n=300, seed=1)
    d, lo, hi = paired["map"]
    assert d > 0 and lo <= d <= hi, paired["map"]
    assert all(lb is not None for lb in paired["per_label"])  # every label has a positive in every resample


def test_a_label_that_gains_out_of_fold_leaves_0_5_though_near_perfect_labels_dilute_the_set():
    """#53: colour + item photos: five near-perfect item labels and a colour label whose model is under-confident.
    The colour's own out-of-fold gain decides; a whole-set check diluted by the item labels used to keep every
    label at 0.5. A label with nothing to gain keeps 0.5, and the line says which rule did what."""
    from mltag.steps.calibrate import choose_thresholds

    rng = np.random.default_rng(1)
    n, items = 1500, 8
    y = np.zeros((n, items + 1), int)
    y[np.arange(n), rng.integers(0, items, n)] = 1  # one item each, scored nearly perfectly
    s = np.where(y == 1, rng.uniform(0.8, 1.0, y.shape), rng.uniform(0.0, 0.2, y.shape))
    blue = rng.random(n) < 0.05  # a rare colour, scored low: 0.5 misses a quarter of it
    y[:, -1] = blue
    s[:, -1] = np.where(blue, rng.uniform(0.4, 0.8, n), rng.uniform(0.0, 0.3, n))
    labels = [f"item{i}" for i in range(items)] + ["blue"]
    th = choose_thresholds(y, s, np.arange(n) % 5, labels, min_gain=0.01)
    assert th["thresholds"]["blue"] < 0.4 and "blue" not in th["kept_0.5"], th["rule"]["blue"]
    assert th["expected"]["per_label_f1_gain"]["blue"] > 0.05
    assert th["rule"]["blue"].startswith("fitted (out of fold +")
    assert all(th["thresholds"][f"item{i}"] == 0.5 for i in range(items))
    assert th["rule"]["item0"].startswith("0.5 kept (out of fold")
    assert 0 < th["expected"]["micro_f1_gain"] < 0.01  # diluted: the old whole-set check would have vetoed it
