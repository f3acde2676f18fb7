"""`mltag drift` on images through the model's own backbone and the vector store: new images like the
training ones pass, darkened copies are drift (exit 3), and the report names the shift."""

from __future__ import annotations

import json

from PIL import Image, ImageEnhance

from conftest import make_colour_dataset, run_cli, write_lst_dataset
from mltag.config import sections
from mltag.steps.bottleneck import bottleneck
from mltag.steps.prepare import prepare
from mltag.steps.train import train


def test_drift_passes_like_images_and_finds_darkened_copies(tmp_path, fake_backbone, mlflow_store):
    from mltag.tools.drift import drift

    data = tmp_path / "colours"
    write_lst_dataset(data, make_colour_dataset(data, n=240))
    prepare(tmp_path / "prepared", **sections("prepare", input=data), progress=False)
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone),
               cache_dir=tmp_path / "store", views=1), progress=False)
    train(tmp_path / "bn", tmp_path / "model", **sections("train", learning_rate=0.05, epochs=150), progress=False)
    like = tmp_path / "like"
    make_colour_dataset(like, n=120, seed=11, start=1000)  # new photos of the same kind
    dark = tmp_path / "dark"
    dark.mkdir()
    for f in sorted((like / "images").iterdir()):
        ImageEnhance.Brightness(Image.open(f)).enhance(0.4).save(dark / f.name, quality=90)

    kw = dict(bottlenecks=tmp_path / "bn", store=str(tmp_path / "store"), progress=False, permutations=300)
    same = drift(str(tmp_path / "model"), [str(like / "images")], tmp_path / "d-like", **kw)
    assert not same["drift"], same["vectors"]
    assert same["vectors"]["p_value"] >= 0.01 and same["images"] == 120 and same["computed"] == 120
    # the effect size a person can judge: about the held-out share for like photos, most of them when darkened
    assert same["unlike_training"]["share"] <= 0.25, same["unlike_training"]
    darker = drift(str(tmp_path / "model"), [str(dark)], tmp_path / "d-dark", **kw)
    assert darker["drift"] and darker["vectors"]["p_value"] < 0.01 and darker["vectors"]["auc"] > 0.9
    assert darker["unlike_training"]["share"] >= 0.5, darker["unlike_training"]
    assert json.loads((tmp_path / "d-dark" / "drift.json").read_text())["drift"] is True
    page = (tmp_path / "d-dark" / "drift.html").read_text()
    assert "Drift: found" in page and page.count("data:image/jpeg;base64") == 12
    # the CLI: exit 3 on drift, so that a scheduler can act; the vectors come from the store now
    p = run_cli("drift", "--model", str(tmp_path / "model"), "--bottlenecks", str(tmp_path / "bn"), "--out",
                str(tmp_path / "d-cli"), str(dark), "--permutations", "200", cwd=tmp_path, check=False)
    assert p.returncode == 3, p.stderr
    assert f"drift: FOUND for {tmp_path / 'model'}: " in p.stdout and "d-cli/drift.html" in p.stdout, p.stdout
    assert "of the 120 new images look unlike the training images (of held-out test images, 5% do)" in p.stdout
    assert p.stdout.count("drift:") == 1, p.stdout  # one summary line
