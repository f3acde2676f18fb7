"""drift's statistics: few false alarms on the same distribution, a shift found, labels compared."""

from __future__ import annotations

import numpy as np


def test_the_mmd_test_rarely_flags_two_halves_of_one_distribution_and_always_flags_a_shift():
    from mltag.tools.drift import mmd_test

    rng = np.random.default_rng(0)
    flagged = 0
    for seed in range(20):
        x = rng.normal(size=(400, 64)) @ rng.normal(size=(64, 64))
        half = rng.permutation(400)
        flagged += mmd_test(x[half[:200]], x[half[200:]], permutations=200, seed=seed)["p_value"] < 0.05
    assert flagged <= 3  # about 5% expected at alpha 0.05: 1 of 20, more than 3 is a broken test
    x = rng.normal(size=(300, 64))
    shifted = rng.normal(size=(300, 64)) + np.r_[1.0, np.zeros(63)]  # one direction of 64 moved by one spread
    r = mmd_test(x, shifted, permutations=200)
    assert r["p_value"] < 0.01 and r["auc"] > 0.6


def test_the_most_atypical_rows_have_the_lowest_similarity_to_the_reference():
    from mltag.tools.drift import mmd_test

    rng = np.random.default_rng(1)
    ref = rng.normal(size=(200, 16))
    new = rng.normal(size=(50, 16))
    new[7] += 12.0  # far from everything
    r = mmd_test(ref, new, permutations=50)
    assert r["new_index"][int(np.argmin(r["witness"]))] == 7


def test_a_label_whose_positive_rate_moves_is_shifted_and_the_others_are_not():
    from mltag.tools.drift import label_shifts

    rng = np.random.default_rng(2)
    ref = rng.random((500, 3))
    new = rng.random((500, 3))
    new[:, 1] = np.clip(new[:, 1] + 0.3, 0, 1)  # 'sea' fires far more often
    shifts = label_shifts(["desert", "sea", "trees"], ref, new, np.full(3, 0.5), 0, 0.01)
    assert [s["shifted"] for s in shifts] == [False, True, False]
    assert shifts[1]["rate_new"] > shifts[1]["rate_reference"] + 0.2 and shifts[1]["ks"] > 0.2
