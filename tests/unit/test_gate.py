"""The paired gate: the challenger and the champion on the same images, a difference inside the noise
promotes nothing."""

from __future__ import annotations

import numpy as np


def _task(n=300, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.4).astype(int)
    return y, rng


def _model(y, rng, noise):
    return np.clip(y * 0.6 + 0.2 + rng.normal(0, noise, y.shape), 0, 1)


def test_two_models_of_the_same_quality_are_not_told_apart():
    from mltag.metrics import paired_bootstrap
    from mltag.registry.gate import paired_gate

    y, rng = _task()
    a, b = _model(y, rng, 0.35), _model(y, rng, 0.35)
    paired = paired_bootstrap(y, a, b, (a >= 0.5).astype(int), (b >= 0.5).astype(int), n=500)
    promote, reason = paired_gate(paired, ["x", "y", "z"], 0.95, 0.0, 0.05)
    assert not promote and reason.endswith("not better with 95% confidence"), reason
    assert paired["map"][1] < 0 < paired["map"][2]


def test_a_clearly_better_model_is_promoted_with_its_interval():
    from mltag.metrics import paired_bootstrap
    from mltag.registry.gate import paired_gate

    y, rng = _task()
    good, weak = _model(y, rng, 0.1), _model(y, rng, 0.6)
    promote, reason = paired_gate(paired_bootstrap(y, good, weak, n=300), ["x", "y", "z"], 0.95, 0.0, 0.05)
    assert promote and reason.startswith("ΔmAP +") and reason.endswith("better with 95% confidence"), reason


def test_a_model_much_worse_on_one_label_is_refused_naming_it_even_when_better_on_average():
    from mltag.metrics import paired_bootstrap
    from mltag.registry.gate import paired_gate

    y, rng = _task(k=4)
    champ = _model(y, rng, 0.5)
    chall = _model(y, rng, 0.05)
    chall[:, 2] = rng.random(len(y))  # label 'sea' becomes a coin toss
    promote, reason = paired_gate(paired_bootstrap(y, chall, champ, n=300), ["a", "b", "sea", "d"], 0.95, 0.0, 0.05)
    assert not promote and reason.startswith("label 'sea' AP -"), reason
    assert "worse by more than max_label_ap_drop 0.05 with 95% confidence" in reason


def test_the_same_draws_for_both_models_make_a_narrower_interval_than_two_separate_ones():
    """Pairing is what makes the gate sensitive: shared hard images cancel out of the difference."""
    from mltag.metrics import bootstrap_ci, paired_bootstrap

    y, rng = _task(n=200)
    a = _model(y, rng, 0.3)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)  # nearly the same model
    paired = paired_bootstrap(y, a, b, n=400)["map"]
    ca, cb = bootstrap_ci(y, a, 0.5, n=400)["map"], bootstrap_ci(y, b, 0.5, n=400)["map"]
    assert paired[2] - paired[1] < 0.5 * ((ca[1] - ca[0]) + (cb[1] - cb[0]))
