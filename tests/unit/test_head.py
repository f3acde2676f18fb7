"""The head's maths: losses and their gradients, the backward pass, side-by-side fold heads."""

from __future__ import annotations

import io

import numpy as np
import pytest


@pytest.mark.parametrize("settings", [
    {"loss": "bce"}, {"loss": "bce", "label_smoothing": 0.1},
    {"loss": "asl", "asl_gamma_neg": 4.0, "asl_gamma_pos": 0.0, "asl_clip": 0.05},
    {"loss": "asl", "asl_gamma_neg": 2.0, "asl_gamma_pos": 2.0, "asl_clip": 0.0},  # focal
    {"loss": "asl", "asl_gamma_neg": 0.0, "asl_gamma_pos": 0.0, "asl_clip": 0.0},  # = BCE
])
def test_head_losses_have_the_gradient_of_their_value(settings):
    """Each loss's analytic gradient against central differences of its own value; ASL with no
    focusing and no clip is BCE."""
    from mltag.head.model import HeadLoss

    loss = HeadLoss.of(settings)
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (6, 4)).astype(np.float64)
    y = (rng.random((6, 4)) < 0.4).astype(np.float32)
    _, grad = loss(z, y)
    eps = 1e-5
    numeric = np.zeros_like(z)
    for i in np.ndindex(z.shape):
        hi, lo = z.copy(), z.copy()
        hi[i] += eps
        lo[i] -= eps
        numeric[i] = (loss(hi, y)[0] - loss(lo, y)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=2e-5, rtol=1e-3)
    if settings.get("asl_gamma_neg") == 0.0 and settings["loss"] == "asl":
        bce_value, bce_grad = HeadLoss.of({})(z.astype(np.float32), y)
        assert abs(loss(z, y)[0] - bce_value) < 1e-5
        np.testing.assert_allclose(grad, bce_grad, atol=1e-6)


@pytest.mark.parametrize("hidden,kind", [(0, "bce"), (5, "bce"), (5, "asl")])
def test_side_by_side_fold_heads_step_as_each_head_alone_on_its_own_rows(hidden, kind):
    """FoldHeads (calibrate's k refits in one pass): head f's logits are NumpyHead's with head f's weights,
    and its gradient is the one NumpyHead.backward gives on head f's own rows alone."""
    from mltag.head.fit import fold_gradient
    from mltag.head.model import FoldHeads, HeadLoss

    rng = np.random.default_rng(4)
    k, x = 3, rng.normal(size=(20, 7)).astype(np.float32)
    y = (rng.random((20, 4)) < 0.4).astype(np.float32)
    folds = np.arange(20) % k
    heads = FoldHeads(7, 4, hidden, k, rng)
    heads.weights = [w + rng.normal(scale=0.1, size=w.shape).astype(np.float32) for w in heads.weights]
    loss = HeadLoss.of({"loss": kind, "asl_gamma_neg": 4.0, "asl_clip": 0.05, "label_smoothing": 0.1})
    z, acts = heads.logits(x)
    own = folds[:, None] != np.arange(k)
    grads = [np.zeros_like(w) for w in heads.weights]
    heads.backward(acts, fold_gradient(loss, z, y, own), 0.0, grads)
    units = hidden or 4
    for f in range(k):
        head = heads.head(f)
        zf, af = head.logits(x)
        np.testing.assert_allclose(z[:, f], zf, atol=1e-5)
        mine = folds != f
        zf, af = head.logits(x[mine])
        alone = [np.zeros_like(w) for w in head.weights]
        head.backward(af, loss(zf, y[mine])[1], 0.0, alone)
        cols = slice(f * units, (f + 1) * units)
        side = [grads[0][:, cols], grads[1][cols]] + ([grads[2][f], grads[3][f]] if hidden else [])
        for a, b in zip(side, alone):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_a_fold_head_never_learns_from_its_own_fold():
    """Whatever fold 0's rows hold, head 0 comes out bit-identical (dropout and a hidden layer on);
    the other heads, which learn from them, do not."""
    from mltag.head.fit import fit_fold_heads
    from mltag.head.model import HeadLoss

    rng = np.random.default_rng(5)
    x = rng.normal(size=(90, 6)).astype(np.float32)
    y = (x[:, :3] > 0).astype(np.float32)
    folds = rng.integers(0, 3, 90)
    kw = dict(learning_rate=0.01, epochs=5, batch_size=8, hidden_units=4, dropout=0.2, seed=3,
              loss=HeadLoss.of({}))
    first = fit_fold_heads(x, y, folds, 3, **kw)
    x2, y2 = x.copy(), y.copy()
    x2[folds == 0] = rng.normal(size=x2[folds == 0].shape) * 5
    y2[folds == 0] = 1 - y2[folds == 0]
    second = fit_fold_heads(x2, y2, folds, 3, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(first[0].weights, second[0].weights))
    assert not np.array_equal(first[1].weights[0], second[1].weights[0])
    # and they learn: each head ranks its own held-out fold well
    from mltag import metrics as M

    long = fit_fold_heads(x, y, folds, 3, **{**kw, "epochs": 60})
    for f, head in enumerate(long):
        assert np.nanmean(M.average_precisions(y[folds == f], head.predict(x[folds == f]))) > 0.9


@pytest.mark.parametrize("hidden,dropout", [(0, 0.0), (0, 0.3), (6, 0.0), (6, 0.3)])
def test_the_head_backward_pass_is_the_gradient_of_its_loss(hidden, dropout):
    """NumpyHead.backward against central differences of the loss, with the same dropout masks
    (a copy of the generator draws them again), through the hidden layer's ReLU and dropout."""
    import copy

    from mltag.head.model import HeadLoss, NumpyHead

    rng = np.random.default_rng(2)
    x = rng.normal(size=(9, 7)).astype(np.float64)
    y = (rng.random((9, 3)) < 0.4).astype(np.float64)
    head = NumpyHead(7, 3, hidden, rng)
    head.weights = [w.astype(np.float64) for w in head.weights]
    masks = np.random.default_rng(11)
    loss = HeadLoss.of({})

    def value():
        z, _ = head.logits(x, dropout, copy.deepcopy(masks))
        return loss(z.astype(np.float64), y)[0]

    z, acts = head.logits(x, dropout, copy.deepcopy(masks))
    _, g = loss(z.astype(np.float64), y)
    grads = [np.zeros_like(w) for w in head.weights]
    head.backward(acts, g.astype(np.float64), dropout, grads)
    eps = 1e-6
    for w, gw in zip(head.weights, grads):
        for idx in list(np.ndindex(w.shape))[:12]:
            keep = w[idx]
            w[idx] = keep + eps
            up = value()
            w[idx] = keep - eps
            down = value()
            w[idx] = keep
            assert gw[idx] == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-7), (idx, hidden, dropout)


def test_label_trust_moves_flipped_training_labels_toward_the_truth_and_keeps_the_rest():
    """``train.label_trust``: out-of-fold heads on the train split contradict the flipped labels of a
    separable task, so those targets move toward the truth; clean targets barely move; the result is
    the same for the same seed (the folds hash the paths)."""
    from mltag.config import sections
    from mltag.head.model import HeadLoss, with_views
    from mltag.steps.train import _trusted_targets

    rng = np.random.default_rng(3)
    truth = (rng.random((300, 3)) < 0.4).astype(np.float32)
    x = (truth @ rng.normal(0, 1, (3, 16)) * 2 + rng.normal(0, 0.3, (300, 16))).astype(np.float32)
    given = truth.copy()
    flipped = rng.random(truth.shape) < 0.05
    given[flipped] = 1 - given[flipped]
    cfg = sections("train", label_trust=0.5, epochs=40, patience=5)["train"]
    settings = {"learning_rate": 0.01, "batch_size": 32, "hidden_units": 0, "dropout": 0.0, "seed": 1,
                "loss": HeadLoss.of({})}
    x_fit, _ = with_views(x[:240], given[:240], None)
    paths = [f"img/{i}.jpg" for i in range(240)]
    soft = _trusted_targets(cfg, settings, x_fit, x[:240], given[:240], x[240:], truth[240:], paths, False)
    moved = np.abs(soft - given[:240])
    assert soft.shape == (240, 3) and soft.min() >= 0 and soft.max() <= 1
    assert moved[flipped[:240]].mean() > 0.35 and moved[~flipped[:240]].mean() < 0.1
    np.testing.assert_array_equal(soft, _trusted_targets(cfg, settings, x_fit, x[:240], given[:240], x[240:],
                                                         truth[240:], paths, False))


def test_occlusion_saliency_finds_what_a_score_depends_on():
    """A scorer that reads only the top-left quarter's red: its saliency lies in and next to that quarter, and
    a label no occlusion changes has an empty map."""
    from mltag.inference.explain import mass_in, occlusion_batch, overlay_png, saliency_maps

    px = np.full((60, 60, 3), 127, np.uint8)
    px[5:25, 5:25] = (230, 20, 20)

    def run(batch):
        red = batch[:, :30, :30, 0].astype(np.float32).mean(axis=(1, 2)) / 255.0
        return np.stack([red, np.full(len(batch), 0.5, np.float32)], axis=1)

    batch, windows = occlusion_batch(px)
    assert len(batch) == len(windows) + 1 == 26 and (batch[0] == px).all()
    scores, maps = saliency_maps(run, px)
    assert maps.shape == (2, 60, 60) and maps[1].max() == 0 and abs(scores[1] - 0.5) < 1e-6
    assert mass_in(maps[0], slice(0, 30), slice(0, 30)) > 0.7 and maps[0][40:, 40:].max() == 0
    assert overlay_png(px, maps[0], 40)[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cell_grid_is_the_per_pixel_map_exactly():
    """The maps are computed per cell and drawn at any size; at the image's own size they are, bit for bit,
    the per-pixel sums over the squares that covered each pixel (the definition), also for a size that the
    cells do not divide; an overlay draws the grid on the thumbnail."""
    from PIL import Image

    from mltag.inference.explain import expand, occlusion_batch, overlay_png, saliency_grid

    rng = np.random.default_rng(0)
    px = rng.integers(0, 255, (67, 67, 3), dtype=np.uint8)
    weights = rng.random((3, 67 * 67 * 3)).astype(np.float32)

    def run(batch):
        return (batch.reshape(len(batch), -1).astype(np.float32) @ weights.T) / 1e6

    scores, grid = saliency_grid(run, px)
    batch, windows = occlusion_batch(px)
    occ = run(batch)
    total, count = np.zeros((3, 67, 67), np.float32), np.zeros((67, 67), np.float32)
    for drop, (rows, cols) in zip(np.maximum(occ[0][None] - occ[1:], 0.0), windows):
        total[:, rows, cols] += drop[:, None, None]
        count[rows, cols] += 1
    assert grid.shape == (3, 6, 6) and np.array_equal(expand(grid, 67), total / np.maximum(count, 1)[None])
    assert np.array_equal(scores, occ[0]) and grid.max() > 0
    thumb = Image.open(io.BytesIO(overlay_png(px, grid[0], 40, fmt="JPEG")))
    assert thumb.format == "JPEG" and thumb.size == (40, 40)
