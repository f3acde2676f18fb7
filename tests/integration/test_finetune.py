"""train.mode fine_tune on CPU: the split network, which weights move, and the model's way through the steps."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from mltag.backbones.builtin import LiteNet, load_state
from mltag.config import sections
from mltag.errors import MltagError


def test_fine_tune_needs_a_builtin_backbone(tmp_path, colour_dataset, fake_backbone):
    from mltag.steps.bottleneck import bottleneck
    from mltag.steps.prepare import prepare
    from mltag.steps.train import train

    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "c", views=1), progress=False)
    with pytest.raises(MltagError, match="fine_tune needs a built-in backbone"):
        train(tmp_path / "bn", tmp_path / "model", **sections("train", mode="fine_tune"), images=colour_dataset, progress=False)
    with pytest.raises(MltagError, match="train.mode: must be one of head, fine_tune, got .finetune."):
        train(tmp_path / "bn", tmp_path / "model", **sections("train", mode="finetune"), progress=False)
    assert not (tmp_path / "model").exists()


def _tuned_weights(model_dir) -> dict[str, np.ndarray]:
    """Backbone weights inside the model folder's backbone SavedModel, keyed like the package's state dict."""
    import tensorflow as tf

    names = {k.lstrip("_").replace(".", "/"): k for k in load_state("efficientnet_lite0")}
    m = tf.saved_model.load(str(model_dir / "backbone"))
    out = {}
    for v in m.variables:
        key = names.get(v.name.split(":")[0])
        if key is not None:  # back from TF's HWIO / HWC1 layouts to the package's OIHW / C1HW
            w = v.numpy()
            out[key] = w.transpose(2, 3, 0, 1) if "_depthwise_conv" in key else w.transpose(3, 2, 0, 1) \
                if w.ndim == 4 else w
    return out


@pytest.mark.slow
def test_fine_tune_moves_only_the_top_blocks_then_evaluates_registers_and_predicts(tmp_path, colour_dataset,
                                                                                    mlflow_store, monkeypatch, capsys):
    """The fine-tune path end to end, train run by the CLI as `dvc exp run -S train.mode=fine_tune` runs it."""
    from mltag.cli import main
    from mltag.data.formats import image_root_of
    from mltag.inference.model import InferenceModel
    from mltag.steps.bottleneck import bottleneck
    from mltag.steps.calibrate import calibrate
    from mltag.steps.evaluate import evaluate
    from mltag.steps.prepare import prepare
    from mltag.steps.register import register

    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    images = image_root_of(tmp_path / "prepared")
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle="builtin:efficientnet_lite0", image_size=64, cache_dir=tmp_path / "cache", views=2, engine="tf"), progress=False)
    # through the CLI as dvc.yaml's train stage runs it (in this process): --prepared is where it finds the images
    (tmp_path / "params.yaml").write_text("train:\n  mode: fine_tune\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--bottlenecks", "bn", "--prepared", "prepared", "--out", "model", "--epochs", "60",
                 "--train.fine_tune_blocks", "2", "--train.fine_tune_epochs", "3", "--train.fine_tune_learning_rate",
                 "1e-3", "--train.fine_tune_patience", "0"]) == 0
    assert re.search(r"fine-tune best epoch \d/3,", capsys.readouterr().out)
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["mode"] == "fine_tune" and meta["fine_tune"]["tuned_blocks"] == [14, 15]

    # Weights moved in blocks 14-15 and the head convolution only, never a batch-norm statistic.
    before = {k: v for k, v in load_state("efficientnet_lite0").items() if "num_batches" not in k and not k.startswith("_fc.")}
    after = _tuned_weights(tmp_path / "model")
    assert set(after) == set(before)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    trainable = {k for k in before if k.startswith(("_blocks.14.", "_blocks.15.", "_conv_head.", "_bn1."))
                 and "running" not in k}
    assert changed == trainable

    # evaluate scores the images end to end (cached vectors no longer match), calibrate uses validation.
    ev = evaluate(tmp_path / "model", tmp_path / "bn", tmp_path / "eval", tmp_path / "ev.json", images, **sections("evaluate", bootstrap=20))
    direct = InferenceModel(tmp_path / "model").scores(
        [images / str(p) for p in np.load(tmp_path / "eval" / "scores.npz")["test_paths"]])
    np.testing.assert_allclose(np.load(tmp_path / "eval" / "scores.npz")["test_scores"], direct, atol=1e-6)
    assert ev["map"] >= 0.8, ev["map"]
    ca = calibrate(tmp_path / "eval", tmp_path / "model", tmp_path / "th.json", tmp_path / "ca.json", **sections("calibrate"), bottlenecks=tmp_path / "bn", progress=False)
    assert "validation" in ca["fitted_on"]
    rg = register(tmp_path / "model", tmp_path / "th.json", tmp_path / "prepared", tmp_path / "rg.json", **sections("register", model_name="tuned"))
    assert rg["version"] == 1 and rg["tflite"]["fp32_max_abs_diff_vs_savedmodel"] <= 1e-4
    # a fine-tuned backbone is served by TensorFlow: its environment says so (a head-mode one has none, #54)
    import mlflow

    reqs = Path(mlflow.pyfunc.get_model_dependencies("models:/tuned/1")).read_text()
    assert "tensorflow==" in reqs and "ai-edge-litert==" in reqs, reqs
    out = InferenceModel(tmp_path / "model").predict([images / "images/0000.jpg"])
    assert set(out[0]["scores"]) == {"red", "green", "blue"}


def _items(dataset, n: int):
    """The first ``n`` images of a dataset as fine_tune takes them: ``(path, content sha256)``, and their labels."""
    from mltag.data.formats import read_lst
    from mltag.inference.lanes import hash_files

    rows = read_lst(dataset / "all.lst")[:n]
    files = [dataset / r.path for r in rows]
    return list(zip(files, hash_files(files))), np.array([r.flags for r in rows], np.float32)


def test_mixed_precision_path_runs_on_cpu(colour_dataset):
    """The GPU's float16 path (loss scaling, fp32 master weights) is the same code; it must run here too."""
    from mltag.steps.finetune import fine_tune

    items, y = _items(colour_dataset, 12)
    head = [np.zeros((1280, 3), np.float32), np.zeros(3, np.float32)]
    cfg = sections("train", fine_tune_blocks=1, fine_tune_epochs=2, fine_tune_learning_rate=1e-3,
                   fine_tune_patience=0, mixed_precision="true")["train"]
    net, head_after, hist = fine_tune("builtin:efficientnet_lite0", 32, items[:8], y[:8], items[8:], y[8:], head,
                                      train=cfg, views=2, progress=False, backbone_cache="")
    assert hist["mixed_precision"] is True and hist["tuned_blocks"] == [15]
    assert all(np.isfinite(hist["loss"])) and hist["loss"][-1] < hist["loss"][0]
    assert head_after[0].dtype == np.float32 and np.abs(head_after[0]).sum() > 0  # master weights stay fp32
    # layer-wise decay and the cosine schedule run the same path (one Adam per block, rates set per step)
    cfg = sections("train", fine_tune_blocks=2, fine_tune_epochs=2, fine_tune_learning_rate=1e-3,
                   fine_tune_patience=0, fine_tune_lr_decay=0.5, fine_tune_schedule="cosine")["train"]
    _, _, hist = fine_tune("builtin:efficientnet_lite0", 32, items[:8], y[:8], items[8:], y[8:], head,
                           train=cfg, views=1, progress=False, backbone_cache="")
    assert hist["tuned_blocks"] == [14, 15] and len(hist["loss"]) == 2 and all(np.isfinite(hist["loss"]))
    with pytest.raises(MltagError, match="fine_tune_blocks must be 1..16"):
        fine_tune("builtin:efficientnet_lite0", 32, items[:8], y[:8], [], y[:0], head,
                  train=sections("train", fine_tune_blocks=17)["train"], views=1, progress=False, backbone_cache="")


def test_the_frozen_bottom_through_litert_gives_tf_s_feature_maps(tmp_path, colour_dataset):
    """Fine-tuning's frozen blocks, converted once to LiteRT and run in lanes on CPU, give the feature
    maps TF gives (to 1e-4); the conversion is kept in the backbone cache and reused."""
    import tensorflow as tf

    from mltag.data.formats import read_lst
    from mltag.data.images import load_image
    from mltag.inference.engine import LiteRTEngine, litert_bottom

    files = [colour_dataset / r.path for r in read_lst(colour_dataset / "all.lst")[:6]]
    px = np.stack([load_image(f, 64) for f in files])
    path = litert_bottom("efficientnet_lite0", 12, 64, tmp_path / "bb")
    assert path.is_file() and litert_bottom("efficientnet_lite0", 12, 64, tmp_path / "bb") == path
    lite = LiteRTEngine(path, threads=1, parallel=2)(px)
    ref = LiteNet("efficientnet_lite0").bottom(tf.constant(px, tf.float32) / 255.0, 12).numpy()
    assert lite.shape == ref.shape and lite.shape[0] == 6
    np.testing.assert_allclose(lite, ref, atol=1e-4)




@pytest.mark.parametrize("k", [0, 12, 15])
def test_the_two_scale_vector_splits_at_any_block(k):
    """``_ms`` fine-tuning: the frozen half (both scales' maps at block k and the middle stages below it) and the
    tuned half give exactly the vector ``multiscale`` gives, wherever the split falls against the middle stages."""
    import tensorflow as tf

    from mltag.backbones.builtin import MID_WEIGHT
    from mltag.steps.finetune import _frozen_bottom, _TopTrainer

    net = LiteNet("efficientnet_lite0")
    assert net.mid_stages() == [10, 14]  # k 12 splits between them, 15 is above both, 0 below both
    px = np.random.default_rng(0).integers(0, 256, (3, 80, 80, 3), dtype=np.uint8)
    frozen = _frozen_bottom("efficientnet_lite0_ms", k, 80, "", net)(px)
    assert len(frozen) == 3 and frozen[2].shape == (3, sum(int(net.blocks[e]["project"][0].shape[-1])
                                                           for e in net.mid_stages() if e < k))
    top = _TopTrainer.__new__(_TopTrainer)
    top.tf, top.net, top.k, top.dtype = tf, net, k, "float32"
    got = top.features(tuple(tf.constant(a) for a in frozen)).numpy()
    want = net.multiscale(tf.constant(px, tf.float32) / 255.0).numpy()
    assert got.shape == want.shape == (3, 1280 + 112 + 192) and MID_WEIGHT < 1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fine_tunes_a_two_scale_builtin_and_ships_its_vector(colour_dataset):
    """``backbone.handle: builtin:..._ms+colour`` fine-tunes (the top blocks at both scales; the colour numbers, a
    function of the pixels, pass through) and the tuned weights are written as the ``_ms+colour`` module, whose
    vectors the tuned head was fitted on."""
    import tensorflow as tf

    from mltag.backbones.builtin import build_lite_module
    from mltag.backbones.colour import COLOUR_DIM, colour_vector
    from mltag.steps.finetune import builtin_name, fine_tune

    assert builtin_name("builtin:efficientnet_lite0_ms") == "efficientnet_lite0_ms"
    assert builtin_name("builtin:efficientnet_lite0_ms+colour") == "efficientnet_lite0_ms+colour"
    items, y = _items(colour_dataset, 10)
    dim = 1584 + COLOUR_DIM
    head = [np.zeros((dim, 3), np.float32), np.zeros(3, np.float32)]
    cfg = sections("train", fine_tune_blocks=3, fine_tune_epochs=2, fine_tune_learning_rate=1e-3,
                   fine_tune_patience=0)["train"]
    net, head_after, hist = fine_tune("builtin:efficientnet_lite0_ms+colour", 64, items[:7], y[:7], items[7:], y[7:],
                                      head, train=cfg, views=1, progress=False, backbone_cache="")
    assert hist["tuned_blocks"] == [13, 14, 15] and all(np.isfinite(hist["loss"]))
    assert net.export_name == "efficientnet_lite0_ms+colour" and head_after[0].shape == (dim, 3)
    assert np.abs(head_after[0][1584:]).sum() > 0  # the head learnt from the colour numbers too
    moved = [not np.array_equal(net.state_dict()[k], v) for k, v in load_state("efficientnet_lite0").items()]
    assert any(moved) and not all(moved)
    module = build_lite_module(net.export_name, net.state_dict())
    x = tf.constant(np.random.default_rng(1).random((2, 64, 64, 3)), tf.float32)
    np.testing.assert_allclose(module.__call__(x).numpy(),
                               np.concatenate([net.multiscale(x).numpy(), colour_vector(x).numpy()], axis=1),
                               rtol=1e-5, atol=1e-5)


_RUN = """
import json, logging, sys
import numpy as np
from pathlib import Path
from mltag.config import sections
from mltag.steps.finetune import fine_tune

from mltag.logs import setup_logging
setup_logging(logging.INFO)  # the CLI's own handler (absl takes the root logger's once TF converts)
a = np.load(sys.argv[1])
items = [(Path(p), s) for p, s in json.loads(Path(sys.argv[2]).read_text())]
cfg = sections("train", fine_tune_blocks=1, fine_tune_epochs=4, fine_tune_learning_rate=1e-3, fine_tune_patience=0,
               batch_size=4, dropout=0.3, seed=3)["train"]
net, head, hist = fine_tune("builtin:efficientnet_lite0", 32, items[:10], a["y"][:10], items[10:], a["y"][10:],
                            [a["w"], a["b"]], train=cfg, views=2, progress=False, backbone_cache=sys.argv[3],
                            checkpoints=sys.argv[4])
top = [v.numpy() for v in net.block_groups(15, bn_affine=True)[0]]
np.savez(sys.argv[5], *head, *top, loss=hist["loss"], resumed_after=hist["resumed_after"])
"""


def test_fine_tuning_killed_mid_epoch_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(
        tmp_path, colour_dataset, caplog):
    """#55: a fine-tune killed (SIGKILL, as a preempted pod) in the middle of epoch 3 resumes after epoch 2 on the
    same inputs, runs only epochs 3-4, and ends with the weights and losses of a run never interrupted (dropout
    included); a finished run's checkpoint holds the result, and other inputs do not find it."""
    import os
    import subprocess
    import sys

    items, y = _items(colour_dataset, 14)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "in.npz", y=y, w=rng.normal(0, 0.01, (1280, 3)).astype(np.float32), b=np.zeros(3, np.float32))
    (tmp_path / "items.json").write_text(json.dumps([[str(p), s] for p, s in items]))
    (tmp_path / "run.py").write_text(_RUN)

    def run(ckpt: str, out: str, fault: str | None = None):
        env = {k: v for k, v in os.environ.items() if k != "MLTAG_FAULT"}
        if fault:
            env["MLTAG_FAULT"] = fault
        return subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "in.npz"),
                               str(tmp_path / "items.json"), "", str(tmp_path / ckpt),
                               str(tmp_path / out)], env=env, capture_output=True, text=True, timeout=600)

    # the uninterrupted run, in this process (the same seeds); the backbone cache is the session's, as in run.py
    from mltag.steps.finetune import checkpoint_key, fine_tune

    cfg = sections("train", fine_tune_blocks=1, fine_tune_epochs=4, fine_tune_learning_rate=1e-3, fine_tune_patience=0,
                   batch_size=4, dropout=0.3, seed=3)["train"]
    a = np.load(tmp_path / "in.npz")

    def fine_tune_here(checkpoints: str):
        return fine_tune("builtin:efficientnet_lite0", 32, items[:10], a["y"][:10], items[10:], a["y"][10:],
                         [a["w"], a["b"]], train=cfg, views=2, progress=False, backbone_cache="",
                         checkpoints=str(tmp_path / checkpoints))

    net, head, hist = fine_tune_here("ck-whole")
    np.savez(tmp_path / "whole.npz", *head, *[v.numpy() for v in net.block_groups(15, bn_affine=True)[0]],
             loss=hist["loss"], resumed_after=hist["resumed_after"])
    assert not list((tmp_path / "ck-whole").glob(".*tmp"))
    killed = run("ck", "never.npz", fault="fine-tune:epoch3")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "never.npz").exists() and len(list((tmp_path / "ck").glob("finetune-*.npz"))) == 1
    resumed = run("ck", "resumed.npz")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch 2/4" in resumed.stderr, (resumed.stderr[-3000:], resumed.stdout[-2000:])
    w, r = np.load(tmp_path / "whole.npz"), np.load(tmp_path / "resumed.npz")
    assert int(w["resumed_after"]) == 0 and int(r["resumed_after"]) == 2  # 2 of 4 epochs run again, not 4
    np.testing.assert_allclose(r["loss"], w["loss"], rtol=1e-4)
    names = [k for k in w.files if k.startswith("arr_")]
    assert len(names) >= 4
    for k in names:
        np.testing.assert_allclose(r[k], w[k], rtol=1e-3, atol=1e-5, err_msg=k)
    assert any(not np.allclose(w[k], np.load(tmp_path / "in.npz")["w"]) for k in names[:1])  # the head moved

    # finished: a rerun (here, in this process) takes the result from the checkpoint without training
    with caplog.at_level(logging.INFO, logger="mltag"):
        _, head, _ = fine_tune_here("ck")
    assert "resuming after epoch 4/4" in caplog.text and "(finished)" in caplog.text, caplog.text
    np.testing.assert_allclose(head[0], w["arr_0"], rtol=1e-3, atol=1e-5)
    # other inputs do not find it: the file is named by everything that decides the result
    base = dict(handle="builtin:efficientnet_lite0", image_size=32, views=2, half=False, train=cfg, items=items,
                arrays=[y, np.zeros(3)])
    key = checkpoint_key(**base)
    assert key == checkpoint_key(**base)
    for change in ({"train": cfg.model_copy(update={"seed": 4})}, {"views": 1}, {"items": items[::-1]},
                   {"arrays": [1 - y, np.zeros(3)]}, {"image_size": 64}):
        assert checkpoint_key(**{**base, **change}) != key, change
