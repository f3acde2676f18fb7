"""Each step on tiny data: a fake pooling hub module, solid-colour JPEGs, a SQLite MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import COLOURS, make_colour_dataset, run_cli, write_lst_dataset
from mltag.config import sections
from mltag.data.formats import read_lst
from mltag.errors import MltagError
from mltag.steps.bottleneck import bottleneck
from mltag.steps.calibrate import calibrate
from mltag.steps.evaluate import evaluate
from mltag.steps.prepare import prepare
from mltag.steps.register import register
from mltag.steps.train import train


def run_all(tmp, dataset, backbone, lr=0.05, name="colours", **reg):
    prepare(tmp / "prepared", **sections("prepare", input=dataset), progress=False)
    bn = bottleneck(tmp / "prepared", tmp / "bn", **sections("bottleneck", handle=str(backbone), cache_dir=tmp / "cache", views=1), progress=False)
    tr = train(tmp / "bn", tmp / "model", **sections("train", learning_rate=lr, epochs=150, patience=30), progress=False, config={"train": {"learning_rate": lr}})
    ev = evaluate(tmp / "model", tmp / "bn", tmp / "eval", tmp / "metrics" / "evaluate.json", **sections("evaluate", bootstrap=50))
    ca = calibrate(tmp / "eval", tmp / "model", tmp / "thresholds.json", tmp / "metrics" / "calibrate.json", **sections("calibrate"), bottlenecks=tmp / "bn", progress=False, report=tmp / "calibrate.json")
    reg.setdefault("bottlenecks", tmp / "bn")  # as dvc.yaml runs it: the test split scored from the cached vectors
    reg.setdefault("card", tmp / "reports" / "model_card.md")
    reg.setdefault("reports", [tmp / "eval" / "details.json", tmp / "calibrate.json"])  # their figures, into the run
    rg = register(tmp / "model", tmp / "thresholds.json", tmp / "prepared", tmp / "register.json", **sections("register", model_name=name, int8="full"), metrics_file=tmp / "metrics" / "register.json", **reg)
    return bn, tr, ev, ca, rg


def test_six_steps_on_tiny_data(tmp_path, colour_dataset, fake_backbone, mlflow_store):
    import mlflow
    from mlflow import MlflowClient

    bn, tr, ev, ca, rg = run_all(tmp_path, colour_dataset, fake_backbone)
    assert bn["computed"] == 48 and bn["feature_dim"] == 6
    assert ev["map"] >= 0.9, ev["map"]
    lo, hi = ev["ci95"]["map"]
    assert lo <= ev["map"] <= hi
    assert ev["baselines"]["all_negative"]["micro_f1"] == 0.0
    assert set(ca["thresholds"]) == set(COLOURS)
    for f in ("scores.npz", "pr_curves.png", "report.html"):
        assert (tmp_path / "eval" / f).is_file()
    assert sorted(p.name for p in (tmp_path / "eval" / "pr").iterdir()) == sorted(f"{c}.csv" for c in COLOURS)
    assert rg["promoted"] and rg["version"] == 1
    # The version carries the TFLite files and their parity: fp32 tight, int8 shipped as it keeps the accuracy.
    par = rg["tflite"]
    assert rg["scored_from"] == "cached vectors" and rg["champion_scored_from"] is None  # no champion yet
    assert rg["challenger_test_map"] == pytest.approx(ev["map"], abs=1e-9)  # the very scores evaluate measured
    assert par["fp32_max_abs_diff_vs_evaluated"] <= 2e-3  # float16 vectors against model.tflite
    assert par["int8_shipped"] and par["int8_kind"] == "int8", par
    assert par["fp32_test_map"] - par["int8_test_map"] <= 0.01 and par["int8_bytes"] > 0
    assert par["int8_calibration_images"] == len(read_lst(tmp_path / "prepared" / "train.lst"))  # all: < 300
    shown = run_cli("metrics", "--evaluate", str(tmp_path / "eval" / "details.json"), "--calibrate",
                    str(tmp_path / "calibrate.json"), "--register", str(tmp_path / "register.json")).stdout
    assert f"{ev['map']:.3f}" in shown and "registry: colours version 1 -> challenger, champion" in shown
    # The DVC metrics files hold the headline figures only; the details are in the reports.
    m = tmp_path / "metrics"
    assert json.loads((m / "evaluate.json").read_text()) == {
        "map": ev["map"], "micro_f1": ev["micro_f1"], "macro_f1": ev["macro_f1"]}
    assert set(json.loads((m / "calibrate.json").read_text())) == {"micro_f1", "macro_f1", "labels_tuned"}
    assert json.loads((m / "register.json").read_text()) == {"version": 1, "gate_passed": 1, "promoted": 1}
    assert json.loads((tmp_path / "eval" / "details.json").read_text())["per_label"].keys() == set(COLOURS)
    assert (tmp_path / "eval" / "train_history.png").read_bytes()[:4] == b"\x89PNG"
    client = MlflowClient()
    mv = client.get_model_version_by_alias("colours", "champion")
    assert str(mv.version) == "1" and mv.run_id == tr["run_id"]
    run = client.get_run(tr["run_id"])
    assert run.data.params["train.learning_rate"] == "0.05"
    assert "test_map" in run.data.metrics and "calibrated_test_micro_f1" in run.data.metrics
    # The registered model carries labels and thresholds: labels come back, not just scores.
    model = mlflow.pyfunc.load_model("models:/colours@champion")
    import base64

    import pandas as pd

    files = os.listdir(mlflow.artifacts.download_artifacts("models:/colours@champion", dst_path=str(tmp_path / "dl"))
                       + "/artifacts/model")
    assert {"model.tflite", "model_int8.tflite", "tflite_parity.json", "thresholds.json"} <= set(files)
    img = colour_dataset / "images" / "0000.jpg"
    truth = read_lst(colour_dataset / "all.lst")[0].flags
    out = model.predict(pd.DataFrame({"image": [base64.b64encode(img.read_bytes()).decode()]}))
    assert out.loc[0, "labels"].split(",") == [c for c, f in zip(COLOURS, truth) if f]
    # a head on its backbone with model.tflite is served by LiteRT: its environment has no TensorFlow (#54)
    dl = tmp_path / "dl"
    reqs = next(dl.rglob("requirements.txt")).read_text().split()
    names = {r.split("==")[0] for r in reqs}
    assert {"ai-edge-litert", "mlflow", "numpy", "pillow"} <= names and not names & {"tensorflow", "tensorflow-hub"}, reqs
    # pinned to this environment's versions; MLflow's package map, given only these names for register's call, is not
    # left truncated (loading the model above built the whole one, as MLflow does)
    from importlib.metadata import version

    from mlflow.utils import requirements_utils

    assert all(r == f"{r.split('==')[0]}=={version(r.split('==')[0])}" for r in reqs), reqs
    table = requirements_utils._MODULES_TO_PACKAGES
    assert table is None or "yaml" in table, table  # the whole map has the module yaml (package pyyaml)


def add_images(root, rows, prepared, n, seed):
    """Add ``n`` images to the dataset at ``root`` (``rows`` grows in place) and prepare it again."""
    rows += make_colour_dataset(root, n=n, seed=seed, start=len(rows))
    write_lst_dataset(root, rows)
    prepare(prepared, **sections("prepare", input=root), progress=False)


def test_bottleneck_cache_computes_only_new_images(tmp_path, fake_backbone):
    root, rows = tmp_path / "data", []
    add_images(root, rows, tmp_path / "prep", n=40, seed=0)
    first = bottleneck(tmp_path / "prep", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "c", views=1), progress=False)
    assert (first["computed"], first["cached"]) == (40, 0)
    add_images(root, rows, tmp_path / "prep", n=4, seed=9)
    second = bottleneck(tmp_path / "prep", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "c", views=1), progress=False)
    assert (second["computed"], second["cached"]) == (4, 40)
    with np.load(tmp_path / "bn" / "train.npz") as z:
        assert z["features"].dtype == np.float16 and z["features"].shape[1] == 6
    # A different image size is a different cache key: nothing stale is reused.
    third = bottleneck(tmp_path / "prep", tmp_path / "bn2", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "c", image_size=32, views=1), progress=False)
    assert third["computed"] == 44








def test_sharded_bottleneck_then_gather(tmp_path, colour_dataset, fake_backbone):
    prepare(tmp_path / "prep", **sections("prepare", input=colour_dataset), progress=False)
    shards = []
    for i in range(3):
        s = bottleneck(tmp_path / "prep", tmp_path / f"shard{i}", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / f"cache{i}", num_shards=3, views=1), shard_index=i, progress=False)
        shards.append(s["computed"])
        assert not (tmp_path / f"shard{i}" / "train.npz").exists()
    assert sum(shards) == 48 and min(shards) > 0
    g = bottleneck(tmp_path / "prep", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "gather", views=1), extra_caches=[tmp_path / f"cache{i}" for i in range(3)], progress=False)
    assert g["computed"] == 0 and g["cached"] == 48


def test_failed_step_leaves_previous_output_intact(tmp_path, colour_dataset, fake_backbone):
    prepare(tmp_path / "prep", **sections("prepare", input=colour_dataset), progress=False)
    bottleneck(tmp_path / "prep", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "c", views=1), progress=False)
    before = (tmp_path / "bn" / "train.npz").read_bytes()
    os.remove(colour_dataset / "images" / "0003.jpg")
    with pytest.raises(MltagError, match="0003.jpg"):
        bottleneck(tmp_path / "prep", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "c2", views=1), progress=False)
    assert (tmp_path / "bn" / "train.npz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".bn")) == []


def test_cli_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "labels.txt").write_text("a\nb\n")
    (bad / "all.lst").write_text("0\t1\t0\tx.jpg\n1\t1\t2\ty.jpg\n")
    p = run_cli("prepare", "--input", str(bad), "--out", str(tmp_path / "out"), check=False, cwd=tmp_path)
    assert p.returncode == 2
    assert f"{bad / 'all.lst'}:2: label flags must be 0 or 1, got '2'" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()
    p = run_cli("metrics", check=False, cwd=tmp_path)
    assert p.returncode == 2 and "no metrics yet" in p.stderr


def test_params_yaml_feeds_cli_defaults_and_flags_override(tmp_path, colour_dataset):
    (tmp_path / "params.yaml").write_text(f"prepare:\n  input: {colour_dataset}\n  test_fraction: 0.3\n")
    run_cli("--quiet", "prepare", "--out", "p1", cwd=tmp_path)
    run_cli("--quiet", "prepare", "--out", "p2", "--test-fraction", "0.15", cwd=tmp_path)
    n1 = len(read_lst(tmp_path / "p1" / "test.lst"))
    n2 = len(read_lst(tmp_path / "p2" / "test.lst"))
    assert n1 > n2
    (tmp_path / "params.yaml").write_text("prepare:\n  colour: 3\n")
    p = run_cli("prepare", check=False, cwd=tmp_path)
    assert "unknown key prepare.colour" in p.stderr


@pytest.mark.slow
def test_predict_cli_local_folder(tmp_path, colour_dataset, fake_backbone, mlflow_store):
    run_all(tmp_path, colour_dataset, fake_backbone)
    shutil.copy(tmp_path / "thresholds.json", tmp_path / "model" / "thresholds.json")
    img = colour_dataset / "images" / "0001.jpg"
    p = run_cli("predict", "--json", "--model", str(tmp_path / "model"), str(img), cwd=tmp_path)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    truth = read_lst(colour_dataset / "all.lst")[1].flags
    assert r["labels"] == [c for c, f in zip(COLOURS, truth) if f]
    p = run_cli("predict", "--json", "--tta", "mean", "--model", str(tmp_path / "model"), str(img), cwd=tmp_path)
    assert json.loads(p.stdout.strip().splitlines()[-1])["labels"] == r["labels"]
    # calibrate's at_least_one: with every threshold out of reach an image still gets its top-scoring label
    th = json.loads((tmp_path / "thresholds.json").read_text())
    high = {**th, "thresholds": {c: 1.0 for c in th["thresholds"]}}  # the top of a score's range
    reached = [c for c in COLOURS if r["scores"][c] >= 1.0]  # a score saturated to exactly 1.0 in float32
    for min_labels, want in ((0, reached), (1, reached or [max(r["scores"], key=r["scores"].get)])):
        (tmp_path / "model" / "thresholds.json").write_text(json.dumps({**high, "min_labels": min_labels}))
        p = run_cli("predict", "--json", "--model", str(tmp_path / "model"), str(img), cwd=tmp_path)
        assert json.loads(p.stdout.strip().splitlines()[-1])["labels"] == want
        p = run_cli("predict", "--model", str(tmp_path / "model"), str(img), cwd=tmp_path)
        assert (want[0] if want else "(no label)") in p.stdout
    shutil.copy(tmp_path / "thresholds.json", tmp_path / "model" / "thresholds.json")
    ev = evaluate(tmp_path / "model", tmp_path / "bn", tmp_path / "eval-tta", tmp_path / "ev-tta.json", **sections("evaluate", bootstrap=0, tta="max"), images=colour_dataset)
    assert ev["tta"] == "max" and ev["map"] >= 0.9
    p = run_cli("predict", "--model", "models:/nope@champion", str(img), cwd=tmp_path, check=False)
    assert p.returncode == 2 and "cannot load model models:/nope@champion" in p.stderr
    p = run_cli("predict", "--model", str(tmp_path / "model"), str(tmp_path / "missing.jpg"), check=False)
    assert p.returncode == 2 and "missing.jpg: error: file not found" in p.stdout


@pytest.mark.slow
def test_register_gate_refuses_worse_and_accepts_better(tmp_path, fake_backbone, mlflow_store):
    from mlflow import MlflowClient

    client = MlflowClient()
    # 240 images: a test split of about 36, enough for the paired gate to be sure of a real difference
    colour_dataset = tmp_path / "colours"
    write_lst_dataset(colour_dataset, make_colour_dataset(colour_dataset, n=240))
    # A weak champion first (tiny learning rate, few epochs), then a strong challenger.
    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "c", views=1), progress=False)

    def cycle(tag, lr, epochs, **gate):
        m = tmp_path / f"model-{tag}"
        train(tmp_path / "bn", m, **sections("train", learning_rate=lr, epochs=epochs, patience=epochs, seed=1, refit=False), progress=False)
        evaluate(m, tmp_path / "bn", tmp_path / f"eval-{tag}", tmp_path / f"ev-{tag}.json", **sections("evaluate", bootstrap=0))
        calibrate(tmp_path / f"eval-{tag}", m, tmp_path / f"th-{tag}.json", tmp_path / f"ca-{tag}.json", **sections("calibrate", cv_folds=0), bottlenecks=tmp_path / "bn")
        return register(m, tmp_path / f"th-{tag}.json", tmp_path / "prepared", tmp_path / f"rg-{tag}.json", **sections("register", model_name="gate"), **gate)

    weak = cycle("weak", 1e-4, 2)
    assert weak["promoted"] and weak["reason"] == "no champion yet"
    strong = cycle("strong", 0.05, 150)
    assert strong["promoted"], strong["reason"]
    assert strong["champion_test_map"] == pytest.approx(weak["challenger_test_map"], abs=1e-6)
    worse = cycle("worse", 1e-4, 2)
    assert not worse["promoted"]
    assert "not better with 95% confidence" in worse["reason"] or "worse by more than" in worse["reason"]
    assert str(client.get_model_version_by_alias("gate", "champion").version) == str(strong["version"])
    assert str(client.get_model_version_by_alias("gate", "challenger").version) == str(worse["version"])
    tags = client.get_model_version("gate", str(worse["version"])).tags
    assert tags["mltag.gate"].startswith("kept: ")


@pytest.mark.slow
def test_register_gate_refuses_a_model_that_regresses_one_label(tmp_path, colour_dataset, fake_backbone,
                                                                mlflow_store):
    """Even with the mAP bar removed (margin -1), one label's AP falling is enough to refuse."""
    from mltag.backbones.builtin import resolve
    from mltag.data.formats import read_head, write_head
    from mltag.inference.engine import litert_backbone
    from mltag.inference.export import compose_tflite

    *_, first = run_all(tmp_path, colour_dataset, fake_backbone, name="onelabel")
    assert first["promoted"]
    bad = tmp_path / "model-bad"
    shutil.copytree(tmp_path / "model", bad)
    weights = read_head(bad)
    weights[-2][:, 2] *= -1.0  # invert the 'blue' output: its AP collapses, the others stay
    weights[-1][2] *= -1.0
    write_head(bad, weights)
    # the LiteRT file must match the head, or register refuses
    compose_tflite(litert_backbone(resolve(str(fake_backbone)), 224, ""), weights, bad / "model.tflite")
    (bad / "run.json").unlink()  # its own run
    from mltag.data.integrity import write_integrity

    write_integrity(bad)  # a model built by hand records its own content hash
    second = register(bad, tmp_path / "thresholds.json", tmp_path / "prepared", tmp_path / "rg-bad.json", **sections("register", model_name="onelabel", margin=-0.99, max_label_ap_drop=0.05), bottlenecks=tmp_path / "bn")
    assert (second["scored_from"], second["champion_scored_from"]) == ("cached vectors", "cached vectors")
    assert not second["promoted"]
    assert second["reason"].startswith("label 'blue' AP -") and \
        "worse by more than max_label_ap_drop 0.05 with 95% confidence" in second["reason"], second["reason"]
    assert second["comparison"]["d_ap"]["blue"][2] < -0.05
    from mlflow import MlflowClient

    assert str(MlflowClient().get_model_version_by_alias("onelabel", "champion").version) == str(first["version"])


def test_augmented_views_are_cached_once_and_only_for_training_images(tmp_path, fake_backbone):
    from mltag.data.formats import load_views

    root, rows = tmp_path / "data", []
    add_images(root, rows, tmp_path / "prep", n=40, seed=0)
    plain = bottleneck(tmp_path / "prep", tmp_path / "bn1", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "c", views=1), progress=False)
    n_train = len(read_lst(tmp_path / "prep" / "train.lst"))
    first = bottleneck(tmp_path / "prep", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "c", views=3), progress=False)
    # The plain vectors came from the cache; only the 2 extra views of each training image were computed.
    assert (plain["computed"], first["computed"], first["cached"]) == (40, 2 * n_train, 40)
    again = bottleneck(tmp_path / "prep", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "c", views=3), progress=False)
    assert again["computed"] == 0
    views = load_views(tmp_path / "bn", "train")
    assert views.shape == (n_train, 2, 6)
    with np.load(tmp_path / "bn" / "train.npz") as z, np.load(tmp_path / "bn1" / "train.npz") as z1:
        assert np.array_equal(z["features"], z1["features"])  # the plain view is the unaugmented vector
        assert not np.allclose(views[:, 0], z["features"], atol=1e-3)  # the views really are other pixels
    # Validation and test hold the plain view only: that is what evaluate scores.
    for split in ("val", "test"):
        assert load_views(tmp_path / "bn", split) is None
        with np.load(tmp_path / "bn" / f"{split}.npz") as z, np.load(tmp_path / "bn1" / f"{split}.npz") as z1:
            assert np.array_equal(z["features"], z1["features"])
    # Adding images computes only the new images' vectors and views.
    add_images(root, rows, tmp_path / "prep", n=6, seed=5)
    new_train = len(read_lst(tmp_path / "prep" / "train.lst")) - n_train
    more = bottleneck(tmp_path / "prep", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "c", views=3), progress=False)
    assert more["computed"] == 6 + 2 * new_train








def test_refit_ships_a_head_fitted_afresh_on_train_and_val_for_the_epochs_val_chose(tmp_path, colour_dataset,
                                                                                  fake_backbone, mlflow_store,
                                                                                  monkeypatch):
    from mltag.data.formats import load_split, load_views, read_head, read_model_meta
    from mltag.head.fit import fit_head
    from mltag.head.model import HeadLoss, Rows

    prepare(tmp_path / "prep", **sections("prepare", input=colour_dataset), progress=False)
    bottleneck(tmp_path / "prep", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "c", views=2), progress=False)
    kw = {"learning_rate": 0.05, "epochs": 60, "patience": 10}
    once = train(tmp_path / "bn", tmp_path / "plain", **sections("train", refit=False, **kw), progress=False)
    again = train(tmp_path / "bn", tmp_path / "refit", **sections("train", refit=True, **kw), progress=False)
    assert not once["refit"] and again["refit"] and again["best_epoch"] == once["best_epoch"]
    hp = read_model_meta(tmp_path / "refit")["head"]
    assert hp["refit"] and not read_model_meta(tmp_path / "plain")["head"]["refit"]
    # The shipped head is the one fit_head makes on every train and val vector (and the train images' views).
    x_tr, y_tr, _ = load_split(tmp_path / "bn", "train")
    x_va, y_va, _ = load_split(tmp_path / "bn", "val")
    views = load_views(tmp_path / "bn", "train")
    rows = Rows(np.concatenate([x_tr, x_va]), views, None, np.arange(len(x_tr)))
    y_all = np.concatenate([y_tr, y_va, np.repeat(y_tr, views.shape[1], axis=0)])
    want, _, _ = fit_head(rows, y_all, None, None, learning_rate=0.05, epochs=once["best_epoch"], batch_size=32,
                          hidden_units=0, dropout=0.2, patience=0, monitor="val_loss", seed=42,
                          loss=HeadLoss.of(hp))
    got, plain = read_head(tmp_path / "refit"), read_head(tmp_path / "plain")
    assert all(np.array_equal(a, b) for a, b in zip(got, want.weights))
    assert not all(np.array_equal(a, b) for a, b in zip(got, plain))
    # Its validation scores are not held out: evaluate says so, and calibrate will not fit thresholds on them.
    ev = evaluate(tmp_path / "refit", tmp_path / "bn", tmp_path / "ev", tmp_path / "ev.json", **sections("evaluate", bootstrap=0))
    assert ev["val"]["seen_in_training"] and ev["map"] >= 0.9
    with pytest.raises(MltagError, match=r"refitted on train\+val .* set calibrate.cv_folds to 2 or more") as e:
        calibrate(tmp_path / "ev", tmp_path / "refit", tmp_path / "th.json", tmp_path / "ca.json", **sections("calibrate", cv_folds=0), bottlenecks=tmp_path / "bn", progress=False)
    assert "model.json" in str(e.value) and not (tmp_path / "th.json").exists()
    ca = calibrate(tmp_path / "ev", tmp_path / "refit", tmp_path / "th.json", tmp_path / "ca.json", **sections("calibrate"), bottlenecks=tmp_path / "bn", progress=False)
    assert "out-of-fold" in ca["fitted_on"] and (tmp_path / "th.json").is_file()
    # Beside the first fit in a forked process (two cores here) or after it (one core): the same head.
    import mltag.workers

    monkeypatch.setattr(mltag.workers, "cpu_threads", lambda: 1)
    train(tmp_path / "bn", tmp_path / "one-core", **sections("train", refit=True, **kw), progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(read_head(tmp_path / "one-core"), got))


def test_out_of_fold_scores_come_from_heads_that_never_saw_the_image(tmp_path, colour_dataset, fake_backbone,
                                                                  mlflow_store, monkeypatch):
    from mltag.head.folds import out_of_fold_scores

    prepare(tmp_path / "prep", **sections("prepare", input=colour_dataset), progress=False)
    bottleneck(tmp_path / "prep", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "c", views=2), progress=False)
    train(tmp_path / "bn", tmp_path / "model", **sections("train", learning_rate=0.05, epochs=80, patience=80), progress=False)
    y, s, folds, paths = out_of_fold_scores(tmp_path / "bn", tmp_path / "model", 4)
    assert len(paths) == len(y) and len(set(paths)) == len(paths)
    n = len(read_lst(tmp_path / "prep" / "train.lst")) + len(read_lst(tmp_path / "prep" / "val.lst"))
    assert y.shape == s.shape == (n, 3) and sorted(set(folds)) == [0, 1, 2, 3]
    from mltag import metrics as M

    assert np.nanmean(M.average_precisions(y, s)) > 0.9  # the colours are learnable from 3/4 of the data
    # Folds depend on the path alone: a second call gives the same folds.
    assert np.array_equal(out_of_fold_scores(tmp_path / "bn", tmp_path / "model", 4)[2], folds)
    # The two groups of heads run on two cores here; on one core, one after the other: the same scores.
    import mltag.workers

    monkeypatch.setattr(mltag.workers, "cpu_threads", lambda: 1)
    assert np.array_equal(out_of_fold_scores(tmp_path / "bn", tmp_path / "model", 4)[1], s)


@pytest.mark.slow
def test_a_quantized_model_that_loses_accuracy_is_not_shipped(tmp_path, colour_dataset, fake_backbone, mlflow_store):
    """The int8 gate: calibrated on black images only, the int8 model's activation ranges miss every real
    image; dynamic range (no calibration) may still pass. Neither passing: no model_int8.tflite, and why."""
    from mltag.data.formats import read_labels
    from mltag.data.integrity import verify_integrity
    from mltag.inference.quantized import tflite_parity
    from mltag.steps.register import _bundle

    run_all(tmp_path, colour_dataset, fake_backbone, name="int8gate")
    bundle = _bundle(tmp_path / "model", tmp_path / "thresholds.json", tmp_path / "scratch" / "model")
    labels = read_labels(tmp_path / "model" / "labels.txt")
    test = read_lst(tmp_path / "prepared" / "test.lst")
    images = [colour_dataset / ex.path for ex in test]
    y = np.array([ex.flags for ex in test])
    from mltag.inference.model import InferenceModel

    fp32 = InferenceModel(bundle).scores(images)
    black = [np.zeros((224, 224, 3), np.uint8)] * 8
    par = tflite_parity(bundle, images, y, labels, [], fp32, representative=black, int8="full", int8_images=8, max_drop=0.01)
    assert par["int8_test_map"] < par["fp32_test_map"] - 0.01 or par["int8_test_micro_f1"] < \
        par["fp32_test_micro_f1"] - 0.01, par  # deliberately bad, and measured so
    if par["int8_shipped"]:
        assert par["int8_kind"] == "dynamic_range" and (bundle / "model_int8.tflite").is_file()
    par = tflite_parity(bundle, images, y, labels, [], fp32, representative=black, int8="full", int8_images=8, max_drop=-1.0)
    assert not par["int8_shipped"] and not (bundle / "model_int8.tflite").exists()
    assert par["int8_reason"].startswith("not shipped: no quantized model stays within -1.0 of fp32")
    verify_integrity(bundle)  # the bundle's recorded content matches what is (not) there


@pytest.mark.parametrize("hidden", [0, 16])
def test_the_numpy_trainer_and_the_saved_keras_head_are_one_model(hidden):
    """The numpy trainer's head (head.npz, scored in numpy by evaluate, calibrate and suggest) is the
    Keras Dense head with the same weights (what a folder from before head.npz holds, head.keras):
    the same scores to 1e-5, with or without a hidden layer."""
    from mltag.head.fit import fit_head
    from mltag.head.model import HeadLoss, NumpyHead
    from mltag.head.saved import predict_head, to_keras

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 24)).astype(np.float16)
    y = (x[:, :3].astype(np.float32) + rng.normal(0, 0.3, (300, 3)) > 0).astype(np.uint8)
    head, history, _ = fit_head(x[:240], y[:240], x[240:], y[240:], learning_rate=0.01, epochs=20, batch_size=32,
                                hidden_units=hidden, dropout=0.2, patience=5, monitor="val_map", seed=1,
                                loss=HeadLoss.of({}))
    assert len(history["loss"]) >= 1 and history["loss"][-1] < history["loss"][0] + 1e-6
    keras_scores = predict_head(to_keras(head, 0.2), x)  # dropout is off at inference in both
    numpy_scores = NumpyHead.from_weights(head.weights).predict(x)
    np.testing.assert_allclose(numpy_scores, keras_scores, atol=1e-5)
    assert 0.0 < float(numpy_scores.min()) and float(numpy_scores.max()) < 1.0


@pytest.mark.slow
def test_train_and_head_scores_need_no_tensorflow(tmp_path, colour_dataset, fake_backbone, mlflow_store):
    """train in head mode (the head fitted in numpy, model.tflite composed from the backbone's LiteRT
    file) and scoring cached vectors with its head run in a process that never imports TF; the
    composed model.tflite scores what head.npz scores on the backbone's LiteRT features."""
    from mltag.backbones.builtin import resolve
    from mltag.data.formats import image_root_of, read_head
    from mltag.data.images import load_image
    from mltag.head.model import NumpyHead
    from mltag.inference.engine import LiteRTEngine, litert_backbone

    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone),
                                                                     cache_dir=tmp_path / "c", views=1), progress=False)
    code = ("import sys, numpy as np; from mltag.config import sections; from mltag.steps.train import train;"
            "from mltag.data.formats import load_split; from mltag.head.saved import head_scores;"
            "train(sys.argv[2], sys.argv[1], **sections('train', learning_rate=0.05, epochs=20), progress=False);"
            "x, y, p = load_split(sys.argv[2], 'test'); s = head_scores(sys.argv[1], x);"
            "assert s.shape == y.shape, s.shape; assert 'tensorflow' not in sys.modules, 'TF imported'; print(len(s))")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model"), str(tmp_path / "bn")],
                       capture_output=True, text=True)
    assert p.returncode == 0 and int(p.stdout.split()[-1]) > 0, p.stderr[-2000:]
    model = tmp_path / "model"
    assert {"head.npz", "model.tflite", "backbone", "model.json"} <= {f.name for f in model.iterdir()}
    assert not (model / "inference").exists() and not (model / "head.keras").exists()
    pixels = np.stack([load_image(f, 224) for f in sorted((image_root_of(tmp_path / "prepared") / "images").glob("*.jpg"))[:8]])
    features = LiteRTEngine(litert_backbone(resolve(str(fake_backbone)), 224, ""))(pixels)
    np.testing.assert_allclose(LiteRTEngine(model / "model.tflite")(pixels),
                               NumpyHead.from_weights(read_head(model)).predict(features), atol=1e-6)




def test_quantized_backbone_features_are_kept_per_image_content_and_a_damaged_memo_is_recomputed(
        tmp_path, colour_dataset, fake_backbone, monkeypatch):
    """register's feature memo beside a cached backbone file: each image runs once (keyed by its
    content), a later call runs only new images, and a damaged memo is read as empty."""
    from mltag.backbones.builtin import resolve
    from mltag.data.formats import read_lst
    from mltag.data.images import load_image
    from mltag.inference import engine
    from mltag.inference import quantized as rg
    from mltag.inference.engine import LiteRTEngine, litert_backbone
    from mltag.inference.lanes import hash_files

    lite = litert_backbone(resolve(str(fake_backbone)), 224, tmp_path / "bbcache")
    images = [colour_dataset / r.path for r in read_lst(colour_dataset / "all.lst")][:10]
    hashes = hash_files(images)
    ran = []
    real = LiteRTEngine.__call__

    def counting(self, pixels):
        ran.append(len(pixels))
        return real(self, pixels)

    monkeypatch.setattr(engine.LiteRTEngine, "__call__", counting)
    first = rg.memo_features(lite, images[:6], hashes[:6], 224)
    assert ran == [6]
    direct = real(LiteRTEngine(lite), np.stack([load_image(p, 224) for p in images]))
    np.testing.assert_allclose(first, direct[:6], atol=1e-6)
    both = rg.memo_features(lite, images, hashes, 224)  # only the 4 new images run
    assert ran == [6, 4]
    np.testing.assert_allclose(both, direct, atol=1e-6)
    memo = lite.with_name(lite.name + ".features.npz")

    def memo_has(wanted):
        with np.load(memo) as z:
            return set(wanted) <= set(z["sha"].tolist())

    assert memo_has(hashes)
    memo.write_bytes(b"not an npz")
    again = rg.memo_features(lite, images, hashes, 224)
    assert ran == [6, 4, 10] and memo_has(hashes) and not memo_has(hashes + ["0" * 64])
    np.testing.assert_allclose(again, direct, atol=1e-6)








def test_the_tracker_logs_what_the_step_sends_and_reports_its_errors(tmp_path, mlflow_store):
    """Tracker, in the step's own process: a train-like run opened, logged and ended, owned by this
    process; a missing run is the MltagError it raised; a failed step's run ends FAILED."""
    import os

    import mlflow
    from mlflow import MlflowClient

    from mltag.errors import MltagError
    from mltag.tracking.runs import MODEL_DIGEST_TAG, Tracker, model_run, owner_tags

    (tmp_path / "a.json").write_text("{}")
    tracker = Tracker(None)
    assert tracker.uri == mlflow_store
    run_id, exp_id = tracker.open_train_run("helper-test", str(tmp_path / "m"), owner_tags(tmp_path / "m"),
                                            {"train.seed": "1"}, {"mltag.step": "train"})
    assert mlflow.active_run().info.run_id == run_id  # left active, as mlflow.start_run leaves it
    tracker.log_to_run(run_id, metrics={"m": 0.5}, tags={MODEL_DIGEST_TAG: "abc"},
                       artifacts=[(str(tmp_path / "a.json"), "x")], series={"epoch_loss": [3.0, 2.0, 1.0]})
    tracker.end_run("FINISHED")
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == exp_id
    assert run.data.params == {"train.seed": "1"} and run.data.metrics["m"] == 0.5
    assert run.data.tags[MODEL_DIGEST_TAG] == "abc" and run.data.tags["mltag.pid"] == str(os.getpid())
    assert [m.value for m in MlflowClient().get_metric_history(run_id, "epoch_loss")] == [3.0, 2.0, 1.0]
    assert [a.path for a in MlflowClient().list_artifacts(run_id, "x")] == ["x/a.json"]

    with pytest.raises(MltagError, match="MLflow run 0123456789abcdef does not exist in the tracking store"):
        model_run(tmp_path, "0123456789abcdef", mlflow_store)
    # a step that fails ends its train run FAILED
    tracker = Tracker(None)
    failed_id, _ = tracker.open_train_run("helper-test", str(tmp_path / "m"), owner_tags(tmp_path / "m"), {}, {})
    tracker.abandon("FAILED")
    assert MlflowClient().get_run(failed_id).info.status == "FAILED"


def test_a_model_without_the_litert_file_that_register_tflite_asks_for_is_refused(tmp_path, colour_dataset,
                                                                                   fake_backbone, mlflow_store):
    """A model folder without model.tflite (train met a full disk, or a module LiteRT cannot convert): with
    register.tflite true, register refuses it before any version, naming the way out; with false it registers."""
    from mlflow import MlflowClient

    from mltag.data.integrity import write_integrity

    run_all(tmp_path, colour_dataset, fake_backbone, name="first")
    (tmp_path / "model" / "model.tflite").unlink()
    write_integrity(tmp_path / "model")  # as train records a folder it wrote without the file
    (tmp_path / "model" / "run.json").unlink()  # its run recorded the folder with the file
    with pytest.raises(MltagError, match="register.tflite is true but the model cannot give its LiteRT files: no "
                                         "model.tflite in the model folder; nothing was registered"):
        register(tmp_path / "model", tmp_path / "thresholds.json", tmp_path / "prepared", tmp_path / "rg2.json",
                 **sections("register", model_name="notflite"), bottlenecks=tmp_path / "bn")
    assert not MlflowClient().search_model_versions("name='notflite'")
    rg = register(tmp_path / "model", tmp_path / "thresholds.json", tmp_path / "prepared", tmp_path / "rg2.json",
                  **sections("register", model_name="notflite", tflite=False), bottlenecks=tmp_path / "bn")
    assert rg["version"] == 1


def test_another_label_set_registers_under_its_own_name_and_a_shared_name_is_refused_before_any_version(
        tmp_path, colour_dataset, fake_backbone, mlflow_store):
    """By default a model is named after its dataset's folder, so the demo's champion and your photos' never
    meet; a name given by hand that another label set already holds is refused, naming the fix."""
    import shutil

    from mlflow import MlflowClient

    from mltag.errors import MltagError

    *_, first = run_all(tmp_path / "a", colour_dataset, fake_backbone, name="")
    assert first["model_name"] == "mltag-colours" and first["promoted"]
    other = tmp_path / "tints"
    shutil.copytree(colour_dataset, other)
    (other / "labels.txt").write_text("ruby\nlime\nnavy\n")
    *_, second = run_all(tmp_path / "b", other, fake_backbone, name="")
    assert second["model_name"] == "mltag-tints" and second["promoted"]
    with pytest.raises(MltagError, match=r"scores other labels \(red, green, blue\), not ruby, lime, navy: a "
                                         r"different label set is a different model. Set register.model_name"):
        run_all(tmp_path / "c", other, fake_backbone, name="mltag-colours")
    assert len(MlflowClient().search_model_versions("name='mltag-colours'")) == 1


def test_a_retrain_that_changes_only_the_seed_is_not_promoted(tmp_path, colour_dataset, fake_backbone, mlflow_store):
    """The same data and recipe with another seed differs by noise only: the paired gate keeps the champion,
    and says so with the difference and its interval."""
    *_, first = run_all(tmp_path, colour_dataset, fake_backbone, name="seeds")
    assert first["promoted"]
    train(tmp_path / "bn", tmp_path / "model", **sections("train", learning_rate=0.05, epochs=150, patience=30, seed=7), progress=False)
    evaluate(tmp_path / "model", tmp_path / "bn", tmp_path / "eval", tmp_path / "ev2.json", **sections("evaluate", bootstrap=0))
    calibrate(tmp_path / "eval", tmp_path / "model", tmp_path / "th2.json", tmp_path / "ca2.json", **sections("calibrate"), bottlenecks=tmp_path / "bn", progress=False)
    second = register(tmp_path / "model", tmp_path / "th2.json", tmp_path / "prepared", tmp_path / "rg2.json", **sections("register", model_name="seeds", tflite=False), bottlenecks=tmp_path / "bn")
    assert not second["promoted"], second["reason"]
    assert "not better with 95% confidence" in second["reason"] and second["reason"].startswith("ΔmAP ")
    d = second["comparison"]["d_map"]
    assert d[1] <= 0.0 <= d[2] or d[1] <= 0.0


def test_every_version_gets_a_model_card_with_every_section_in_markdown_and_html(tmp_path, colour_dataset,
                                                                                  fake_backbone, mlflow_store):
    from html.parser import HTMLParser

    import mlflow
    from mlflow import MlflowClient

    *_, rg = run_all(tmp_path, colour_dataset, fake_backbone, name="carded")
    md = (tmp_path / "reports" / "model_card.md").read_text()
    sections = ["Model", "Intended use", "Data", "Training recipe", "Test metrics", "How it decides", "LiteRT and int8",
                "Promotion", "Label review", "Known limits"]
    assert [ln[3:] for ln in md.splitlines() if ln.startswith("## ")] == sections
    assert f"Registered model `carded`, version {rg['version']}" in md and "| red |" in md
    assert "Promoted to champion: no champion yet" in md and "mAP " in md and "[" in md

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.h2, self.tags = [], []

        def handle_starttag(self, tag, attrs):
            if tag not in ("meta", "br", "img", "hr", "link"):  # void elements have no end tag
                self.tags.append(tag)

        def handle_data(self, data):
            if self.tags and self.tags[-1] == "h2":
                self.h2.append(data)

        def handle_endtag(self, tag):
            assert self.tags.pop() == tag

    page = Collect()
    page.feed((tmp_path / "reports" / "model_card.html").read_text())
    assert page.h2 == sections and page.tags == []  # every tag closed
    run = rg["run_id"]
    logged = {a.path for a in MlflowClient().list_artifacts(run, "model_card")}
    assert logged == {"model_card/model_card.md", "model_card/model_card.html"}
    assert mlflow.artifacts.load_text(f"runs:/{run}/model_card/model_card.md") == md
    assert MlflowClient().get_model_version("carded", str(rg["version"])).description.startswith("Promoted: no champion")


def test_exclusive_label_groups_from_prepare_to_prediction(tmp_path, fake_backbone):
    """#53: single-colour photos (one of red, green, blue each) are one exclusive group: prepare finds it, train
    records it, calibrate puts it in thresholds.json, evaluate reports its accuracy, and the model predicts exactly
    one colour per photo whatever the thresholds; declared groups are checked on every image."""
    from conftest import colour_image
    from mltag.data.formats import label_groups_of
    from mltag.inference.model import InferenceModel

    rng = np.random.default_rng(5)
    root = tmp_path / "single"
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(60):
        flags = tuple(int(j == i % 3) for j in range(3))
        rel = f"images/{i:04d}.jpg"
        colour_image(flags, rng).save(root / rel, "JPEG", quality=90)
        rows.append((rel, flags))
    write_lst_dataset(root, rows)
    r = prepare(tmp_path / "prepared", **sections("prepare", input=root), progress=False)
    assert r["label_groups"] == [list(COLOURS)] == label_groups_of(tmp_path / "prepared")
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone),
                                                                   cache_dir=tmp_path / "cache", views=1), progress=False)
    train(tmp_path / "bn", tmp_path / "model", **sections("train", learning_rate=0.05, epochs=60), progress=False,
          exclusive_groups=label_groups_of(tmp_path / "prepared"))
    assert json.loads((tmp_path / "model" / "model.json").read_text())["label_groups"] == [list(COLOURS)]
    ev = evaluate(tmp_path / "model", tmp_path / "bn", tmp_path / "eval", tmp_path / "ev.json",
                  **sections("evaluate", bootstrap=10))
    assert ev["groups"][0]["labels"] == list(COLOURS) and ev["groups"][0]["accuracy"] >= 0.8
    assert "Exclusive label groups" in (tmp_path / "eval" / "report.html").read_text()
    ca = calibrate(tmp_path / "eval", tmp_path / "model", tmp_path / "th.json", tmp_path / "ca.json",
                   **sections("calibrate"), bottlenecks=tmp_path / "bn", progress=False)
    assert ca["groups"] == [list(COLOURS)] and json.loads((tmp_path / "th.json").read_text())["groups"] == ca["groups"]
    assert ca["rule"]["red"].startswith("exclusive group")
    assert ca["test_at_thresholds"]["group_accuracy"][0]["images"] == ca["test_at_thresholds"]["n_images"]
    # thresholds that would give no colour (or every colour) do not matter inside the group: one each
    th = json.loads((tmp_path / "th.json").read_text())
    for t in (0.999, 0.001):
        th["thresholds"] = dict.fromkeys(COLOURS, t)
        (tmp_path / "th.json").write_text(json.dumps(th))
        model = InferenceModel(tmp_path / "model", thresholds=th)
        out = model.predict([root / rel for rel, _ in rows[:9]])
        assert [len(o["labels"]) for o in out] == [1] * 9, out
        assert [o["labels"][0] for o in out] == [COLOURS[i % 3] for i in range(9)]
    # declared: checked on every image, the first offenders named with their line; none: no group
    with pytest.raises(MltagError, match=r"exactly one of red, green, but 20 image\(s\).*all.lst:"):
        prepare(tmp_path / "p2", **sections("prepare", input=root, label_groups="red,green"), progress=False)
    with pytest.raises(MltagError, match="names label.s. no image has: pink"):
        prepare(tmp_path / "p2", **sections("prepare", input=root, label_groups="red,pink; green,blue"), progress=False)
    assert prepare(tmp_path / "p3", **sections("prepare", input=root, label_groups="none"),
                   progress=False)["label_groups"] == []


@pytest.mark.parametrize("warm", [False, True])
def test_identical_images_under_two_names_get_their_vectors_in_every_split(tmp_path, colour_dataset, fake_backbone,
                                                                          warm):
    """Identical bytes under two names share their store keys: each gets its vectors in the split files, whether
    computed in this run or read from the store (a vector was let go at its first use, and the second name failed
    with "no cached vector")."""
    lst = colour_dataset / "all.lst"
    lines = lst.read_text().splitlines()
    for k, i in enumerate((0, 1, 2, 3, 5, 8)):  # six copies, so that some land in other splits than their twin
        idx, *flags, rel = lines[i].split("\t")
        copy = f"images/copy{k}.jpg"
        shutil.copy(colour_dataset / rel, colour_dataset / copy)
        lines.append("\t".join([str(100 + k), *flags, copy]))
    lst.write_text("\n".join(lines) + "\n")
    prepare(tmp_path / "prepared", **sections("prepare", input=colour_dataset), progress=False)
    kw = sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "cache", views=2)
    if warm:  # every vector in the store already: they come from the store, not from this run
        bottleneck(tmp_path / "prepared", tmp_path / "bn0", **kw, progress=False)
    s = bottleneck(tmp_path / "prepared", tmp_path / "bn", **kw, progress=False)
    assert (s["computed"] == 0) if warm else (s["computed"] > 0) and s["images"] == 54
    n = 0
    for split in ("train", "val", "test"):
        with np.load(tmp_path / "bn" / f"{split}.npz") as z:
            assert len(z["features"]) == len(z["paths"]) and np.isfinite(z["features"].astype(np.float32)).all()
            n += len(z["paths"])
    assert n == 54
