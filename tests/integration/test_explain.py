"""Saliency: on synthetic photos whose label's object sits in a known quarter, most of the occlusion map's
mass for that label lands in that quarter (a real built-in backbone and a trained head); the overlays reach
predict --explain, the evaluation report and the review page."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from conftest import blank_store
from mltag.config import sections

QUARTERS = [(0, 0), (0, 1), (1, 0), (1, 1)]


def _scene(rng, size: int = 224):
    """A grey textured background with a red disc (label ``disc``) in one quarter and, in half the images, a blue
    square (label ``square``) in another. Returns the image, the flags and each object's quarter."""
    px = np.clip(127 + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(px)
    draw = ImageDraw.Draw(im)
    order = rng.permutation(4)
    q_disc, q_square = QUARTERS[order[0]], QUARTERS[order[1]]
    h = size // 2
    has_disc, has_square = rng.random() < 0.6, rng.random() < 0.5
    if not has_disc and not has_square:
        has_disc = True
    r = int(rng.integers(size // 8, size // 5))
    if has_disc:
        cy, cx = q_disc[0] * h + h // 2 + rng.integers(-10, 10), q_disc[1] * h + h // 2 + rng.integers(-10, 10)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(210, 30, 30))
    if has_square:
        cy, cx = q_square[0] * h + h // 2, q_square[1] * h + h // 2
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=(30, 40, 200))
    return im, (int(has_disc), int(has_square)), q_disc


def _dataset(root, n: int, seed: int):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines, quarters = [], {}
    for i in range(n):
        im, flags, q = _scene(rng)
        rel = f"images/{seed}-{i:03d}.jpg"
        im.save(root / rel, "JPEG", quality=92)
        lines.append("\t".join([str(i), *map(str, flags), rel]))
        quarters[rel] = (flags, q)
    (root / "labels.txt").write_text("disc\nsquare\n")
    (root / "all.lst").write_text("\n".join(lines) + "\n")
    return quarters


def test_most_saliency_mass_lands_in_the_object_s_quarter(tmp_path):
    from mltag.inference.explain import Explainer, expand, mass_in
    from mltag.inference.model import InferenceModel
    from mltag.steps.bottleneck import bottleneck
    from mltag.steps.prepare import prepare
    from mltag.steps.train import train

    data = tmp_path / "scenes"
    _dataset(data, 80, seed=1)
    prepare(tmp_path / "prepared", **sections("prepare", input=data, val_fraction=0.2, test_fraction=0.15),
            progress=False)
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle="builtin:efficientnet_lite0",
                                                                  cache_dir=tmp_path / "store", views=1), progress=False)
    train(tmp_path / "bn", tmp_path / "model", **sections("train", epochs=200, patience=20, learning_rate=0.01),
          tracking_uri=blank_store(tmp_path / "mlflow.db"), progress=False)
    held = _dataset(tmp_path / "held", 16, seed=2)
    model = InferenceModel(tmp_path / "model")
    explainer = Explainer(model)
    fractions = []
    for rel, (flags, q) in held.items():
        if not flags[0]:
            continue
        px, scores, maps = explainer.maps(tmp_path / "held" / rel)
        s = px.shape[0] // 2
        fractions.append(mass_in(expand(maps[0], 2 * s), slice(q[0] * s, q[0] * s + s), slice(q[1] * s, q[1] * s + s)))
    # a map with no idea where the disc is puts a quarter of its mass in the disc's quarter
    assert len(fractions) >= 6 and np.median(fractions) > 0.6, fractions
    print(f"saliency mass in the disc's quarter: median {np.median(fractions):.2f}, mean {np.mean(fractions):.2f} "
          f"over {len(fractions)} images")

    # the evaluation report: an overlay beside every photo of the worst-error gallery
    from mltag.data.formats import image_root_of
    from mltag.steps.evaluate import evaluate

    evaluate(tmp_path / "model", tmp_path / "bn", tmp_path / "eval", tmp_path / "ev.json", image_root_of(tmp_path / "prepared"),
             **sections("evaluate", bootstrap=10))
    html = (tmp_path / "eval" / "report.html").read_text()
    assert html.count("<figure>") == html.count('alt="where the model looked for ')  # the model may make no error
    from mltag import metrics as M
    from mltag.steps.evaluate import error_report_html

    paths = sorted(held)[:3]  # scored as if every one were a false positive of both labels
    y, s = np.zeros((3, 2)), np.full((3, 2), 0.9)
    html = error_report_html(y, s, [0.5, 0.5], ["disc", "square"], paths, tmp_path / "held", M.compute(y, s, 0.5, ["disc", "square"]),
                             b"", explainer=explainer)
    assert html.count('alt="where the model looked for disc in ') == html.count('alt="where the model looked for square in ') == 3

    # predict --explain: one overlay PNG per image and chosen label
    from mltag.tools.predict import predict

    one = sorted(held)[0]
    ok, failed = predict(str(tmp_path / "model"), [str(tmp_path / "held" / one)], "text", open(tmp_path / "p.txt", "w"),
                         progress=False, explain=tmp_path / "explained")
    written = sorted(p.name for p in (tmp_path / "explained").iterdir())
    chosen = (tmp_path / "p.txt").read_text()
    assert ok == 1 and failed == 0 and written, chosen
    assert all(w.startswith("00001-") and w.endswith(".png") for w in written)
    assert {w.split(".")[-2] for w in written} == {lb for lb in ("disc", "square") if f"{lb} (" in chosen}
    with Image.open(tmp_path / "explained" / written[0]) as im:
        assert im.size == (224, 224)
