"""LiteRT engine: parity with TF on real photos, the fallback, the exported .tflite model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mltag.backbones import builtin as bb
from mltag.config import sections
from mltag.inference.engine import LiteRTEngine, TFEngine, backbone_engine, tflite_path


def real_photos(size: int) -> np.ndarray:
    from skimage import data

    names = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry")
    return np.stack([np.asarray(Image.fromarray(getattr(data, n)()).convert("RGB").resize((size, size),
                                                                                         Image.BILINEAR))
                     for n in names])


def assert_same_in_float16(a: np.ndarray, b: np.ndarray) -> None:
    """The cache stores float16: the engines may share it only if their difference is below what storing
    a vector as float16 changes anyway, and rounding makes almost every stored value identical."""
    storage_error = np.abs(a - a.astype(np.float16).astype(np.float32)).max()
    assert np.abs(a - b).max() <= storage_error, (float(np.abs(a - b).max()), float(storage_error))
    assert (a.astype(np.float16) == b.astype(np.float16)).mean() > 0.95


@pytest.mark.slow
@pytest.mark.parametrize("which", ["builtin", "fake"])
def test_litert_matches_tf_on_real_photos(which, tmp_path, fake_backbone):
    handle = "builtin:efficientnet_lite0" if which == "builtin" else str(fake_backbone)
    cache = "" if which == "builtin" else tmp_path / "bb"  # the built-in: the session's shared cache (conftest)
    resolved = bb.resolve(handle, cache)
    px = real_photos(224)
    lite = backbone_engine("litert", resolved, 224, cache)
    assert isinstance(lite, LiteRTEngine)
    assert tflite_path(resolved, 224, cache).is_file()  # converted once, kept beside the backbone
    # and its dynamic-range form with it (register's int8 model), while TF and the module are loaded
    assert tflite_path(resolved, 224, cache, "dynamic_range").is_file()
    tf_out, lite_out = TFEngine(resolved.location)(px), lite(px)
    assert tf_out.shape == lite_out.shape == (5, 1280 if which == "builtin" else 6)
    assert np.abs(tf_out - lite_out).max() < 1e-4
    assert_same_in_float16(tf_out, lite_out)


def test_unconvertible_module_falls_back_to_tf_with_one_line(tmp_path, caplog):
    import tensorflow as tf

    class Odd(tf.Module):  # Igamma has no TFLite kernel
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            m = tf.reduce_mean(images, axis=[1, 2])
            return tf.concat([m, tf.math.igamma(m + 1.0, m + 1.0)], axis=1)

    tf.saved_model.save(Odd(), str(tmp_path / "odd"))
    resolved = bb.resolve(str(tmp_path / "odd"))
    with caplog.at_level(logging.WARNING, logger="mltag"):
        eng = backbone_engine("auto", resolved, 32, tmp_path / "bb")
    assert isinstance(eng, TFEngine)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "using tf" in lines[0] and "Igamma" in lines[0], lines
    # The reason is remembered: the next run does not try (and fail) to convert again.
    assert tflite_path(resolved, 32, tmp_path / "bb").with_suffix(".failed").is_file()
    out = eng(np.full((2, 32, 32, 3), 255, np.uint8))
    assert out.shape == (2, 6) and np.allclose(out[:, :3], 1.0)


def test_engine_flag_is_checked(tmp_path, fake_backbone):
    from mltag.errors import MltagError

    with pytest.raises(MltagError, match="bottleneck.engine must be one of"):
        backbone_engine("cuda", bb.resolve(str(fake_backbone)), 32, tmp_path)


@pytest.mark.slow
def test_tflite_export_predicts_the_same_labels_on_the_demo_test_split(tmp_path, mlflow_store):
    """The built-in backbone on the demo scenes: model.tflite (LiteRT) labels = SavedModel (TF) labels."""
    from mltag.data.demo import make_demo_data
    from mltag.data.formats import image_root_of, load_prepared
    from mltag.inference.model import InferenceModel
    from mltag.steps.bottleneck import bottleneck
    from mltag.steps.prepare import prepare
    from mltag.steps.train import train

    make_demo_data(tmp_path / "demo", **sections("demo-data", n_images=90))
    prepare(tmp_path / "prep", **sections("prepare", input=tmp_path / "demo"), progress=False)
    bottleneck(tmp_path / "prep", tmp_path / "bn", **sections("bottleneck", handle="builtin:efficientnet_lite0", cache_dir=tmp_path / "c", views=1), progress=False)  # the test session's shared backbone cache (conftest)
    train(tmp_path / "bn", tmp_path / "model", **sections("train", epochs=60, patience=60), progress=False)
    assert (tmp_path / "model" / "model.tflite").is_file()
    _, test = load_prepared(tmp_path / "prep", "test")
    images = [image_root_of(tmp_path / "prep") / ex.path for ex in test]
    saved = InferenceModel(tmp_path / "model", engine="tf")
    lite = InferenceModel(tmp_path / "model" / "model.tflite")
    assert (saved.engine, lite.engine) == ("tf", "litert")
    assert InferenceModel(tmp_path / "model").engine == "litert"  # auto on a CPU machine
    s_tf, s_lite = saved.scores(images), lite.scores(images)
    assert np.abs(s_tf - s_lite).max() <= 1e-4
    assert [p["labels"] for p in saved.predict(images)] == [p["labels"] for p in lite.predict(images)]
    assert np.abs(saved.scores(images[:3], tta="mean") - lite.scores(images[:3], tta="mean")).max() <= 1e-4


class Lanes:
    """An engine with lanes whose runners record which lane ran each image, and can turn the
    output for one image (recognised by its pixels) non-finite."""

    def __init__(self, eng, nan_for=None):
        self.eng, self.nan_for, self.ran = eng, nan_for, []

    def lanes(self):
        def runner(i, run):
            def go(px):
                out = run(px)
                self.ran.append(i)
                if self.nan_for is not None and np.array_equal(px[0], self.nan_for):
                    out = out.copy()
                    out[0, 0] = np.nan
                return out
            return go
        return [runner(i, run) for i, run in enumerate(self.eng.lanes())]

    def __call__(self, px):  # never used: an engine with lanes is run lane by lane
        raise AssertionError("called on a whole batch")


@pytest.mark.parametrize("engine", ["litert", "litert-lanes", "tf"])
def test_compute_missing_caches_the_engines_vectors_and_stops_on_errors(engine, tmp_path, colour_dataset,
                                                                       fake_backbone):
    """Whatever the batch split, each image's cached vector is the engine's own output for it; a
    non-finite output stops the run naming the image and its source line, and a cache that cannot
    be written is a clear error, not a hang or a traceback from the writer thread. With lanes
    (one single-threaded interpreter per core, as the bottleneck step runs LiteRT) each image is
    run by one lane, whichever, and the batches still come out whole and right."""
    from mltag.data.formats import load_hashes
    from mltag.data.images import load_image
    from mltag.data.store import FeatureCache
    from mltag.errors import MltagError
    from mltag.inference.lanes import batch_sizes, compute_missing
    from mltag.steps.prepare import prepare

    prepare(tmp_path / "prep", **sections("prepare", input=colour_dataset), progress=False)
    resolved = bb.resolve(str(fake_backbone))
    eng = backbone_engine(engine.split("-")[0], resolved, 32, tmp_path / "bb")
    assert eng.name == engine.split("-")[0]
    if engine == "litert-lanes":  # two lanes whatever this machine's cores
        from mltag.workers import cpu_threads

        assert len(backbone_engine("litert", resolved, 32, tmp_path / "bb", lanes=True).lanes()) == cpu_threads()
        eng = Lanes(LiteRTEngine(tflite_path(resolved, 32, tmp_path / "bb"), threads=1, parallel=2))
    jobs = [(sha, str(colour_dataset / rel), f"all.lst:{i + 1}", sha, 0)
            for i, (rel, sha) in enumerate(sorted(load_hashes(tmp_path / "prep").items()))]
    cache = FeatureCache(tmp_path / "cache", resolved.backbone_id, 32)
    assert batch_sizes(48, 5) == [1, 2, 4] + [5] * 8 + [1]  # the engine starts after one image's decode
    made, kept = [], {}  # the engine made while the first batches decode; the vectors kept for the caller

    def make():
        made.append(eng)
        return eng

    assert compute_missing(jobs, cache, None, 32, batch_size=5, progress=False, make_engine=make,
                           keep=kept) == len(jobs) == 48
    assert made == [eng] and sorted(kept) == sorted(j[0] for j in jobs)
    if engine == "litert-lanes":
        assert len(eng.ran) == 48 and set(eng.ran) <= {0, 1}  # each image run once, by one lane
    expected = (eng.eng if engine == "litert-lanes" else eng)(np.stack([load_image(j[1], 32) for j in jobs]))
    got = np.stack([cache.get(j[0]) for j in jobs]).astype(np.float32)
    assert np.abs(got - expected).max() <= 1e-3  # float16 storage
    assert all(np.array_equal(kept[j[0]], cache.get(j[0])) for j in jobs)

    class NaNAtSeventh:  # the engine's output for one image turns non-finite
        def __init__(self):
            self.seen = 0

        def __call__(self, px):
            out = eng(px)
            if self.seen <= 6 < self.seen + len(px):
                out[6 - self.seen, 0] = np.nan
            self.seen += len(px)
            return out

    cache2 = FeatureCache(tmp_path / "cache2", resolved.backbone_id, 32)
    bad = Lanes(eng.eng, nan_for=load_image(jobs[6][1], 32)) if engine == "litert-lanes" else NaNAtSeventh()
    with pytest.raises(MltagError, match="non-finite features") as e:
        compute_missing(jobs, cache2, bad, 32, batch_size=5, progress=False)
    assert jobs[6][1] in str(e.value) and jobs[6][2] in str(e.value)
    assert cache2.get(jobs[6][0]) is None

    (tmp_path / "blocked").write_text("a file where the cache folder must be\n")
    with pytest.raises(MltagError, match="cannot write the feature cache"):
        compute_missing(jobs, FeatureCache(tmp_path / "blocked", resolved.backbone_id, 32), eng, 32,
                        batch_size=5, progress=False)


@pytest.mark.slow
def test_an_inference_model_scores_from_many_threads_at_once_as_it_does_alone(tmp_path, mlflow_store):
    """`mlflow models serve` calls predict from several threads: a LiteRT interpreter is not thread-safe, so
    concurrent calls must give exactly the serial scores (they failed with HTTP 400 under load before)."""
    import threading

    from mltag.data.demo import make_demo_data
    from mltag.inference.model import InferenceModel
    from mltag.steps.bottleneck import bottleneck
    from mltag.steps.prepare import prepare
    from mltag.steps.train import train

    make_demo_data(tmp_path / "demo", **sections("demo-data", n_images=40))
    prepare(tmp_path / "prep", **sections("prepare", input=tmp_path / "demo"), progress=False)
    bottleneck(tmp_path / "prep", tmp_path / "bn", **sections("bottleneck", handle="builtin:efficientnet_lite0", cache_dir=tmp_path / "c", views=1), progress=False)
    train(tmp_path / "bn", tmp_path / "model", **sections("train", epochs=20, patience=20), progress=False)
    model = InferenceModel(tmp_path / "model")
    assert model.engine == "litert"
    images = sorted((tmp_path / "demo" / "images").glob("*.jpg"))[:12]
    alone = model.scores(images)
    got, errors = {}, []

    def worker(k):
        try:
            for _ in range(3):
                got[k] = model.scores(images[k: k + 2])
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(0, 12, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k, s in got.items():
        np.testing.assert_allclose(s, alone[k: k + 2], atol=1e-6)


def test_a_conversion_that_ran_out_of_memory_is_tried_again_next_time(tmp_path, fake_backbone, monkeypatch):
    """#51: a conversion that met a MemoryError or a full disk was remembered as failed for good (``.failed``), so
    every later run fell back to TF; now only the module's own failure is remembered."""
    import tensorflow as tf

    import mltag.inference.engine as engine
    from mltag.errors import TransientError

    resolved = bb.resolve(str(fake_backbone))
    failed = tflite_path(resolved, 32, tmp_path / "bb").with_suffix(".failed")

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    with monkeypatch.context() as m:
        m.setattr(tf.lite.TFLiteConverter, "from_concrete_functions", out_of_memory)
        with pytest.raises(TransientError, match="ran out of memory"):
            engine.litert_backbone(resolved, 32, tmp_path / "bb")
    assert not failed.exists()
    lite = engine.litert_backbone(resolved, 32, tmp_path / "bb")
    assert lite.is_file()  # the next run converts it
    # the conversion's lock lives beside it, in the backbone cache: pods sharing that volume exclude each other (#55)
    assert Path(f"{lite}.build.lock").is_file()
