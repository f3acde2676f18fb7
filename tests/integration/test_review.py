"""review (likely label errors from out-of-fold scores), review apply (the way back) and suggest (active
learning), on the colour task where a wrong label is obvious to a head that never saw the image."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import COLOURS, make_colour_dataset, run_cli, write_lst_dataset
from mltag.config import sections
from mltag.steps.bottleneck import bottleneck
from mltag.steps.calibrate import calibrate
from mltag.steps.evaluate import evaluate
from mltag.steps.prepare import prepare
from mltag.steps.train import train


def _flip(rows, picks):
    """Flip label j of row i for each (i, j); return the new rows and the flipped (path, label) pairs."""
    rows = [(p, list(f)) for p, f in rows]
    for i, j in picks:
        rows[i][1][j] = 1 - rows[i][1][j]
    return [(p, tuple(f)) for p, f in rows], {(rows[i][0], COLOURS[j]) for i, j in picks}


@pytest.fixture
def reviewed(tmp_path, fake_backbone, mlflow_store):
    from mltag.steps.review import review

    data = tmp_path / "colours"
    rows, flipped = _flip(make_colour_dataset(data, n=90), [(3, 0), (10, 1), (25, 2), (40, 0), (61, 1), (77, 2)])
    write_lst_dataset(data, rows)
    prepare(tmp_path / "prepared", **sections("prepare", input=data), progress=False)
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "cache", views=1), progress=False)
    train(tmp_path / "bn", tmp_path / "model", **sections("train", learning_rate=0.05, epochs=150, patience=30), progress=False)
    evaluate(tmp_path / "model", tmp_path / "bn", tmp_path / "eval", tmp_path / "ev.json", **sections("evaluate", bootstrap=20))
    calibrate(tmp_path / "eval", tmp_path / "model", tmp_path / "th.json", tmp_path / "ca.json", **sections("calibrate"), bottlenecks=tmp_path / "bn", progress=False, oof_out=tmp_path / "oof.npz")
    r = review(tmp_path / "oof.npz", tmp_path / "review", tmp_path / "rv.json", **sections("review", filter_by="prune_by_noise_rate", thumbnails=24), prepared=tmp_path / "prepared", model_dir=tmp_path / "model")
    return tmp_path, data, flipped, r


def test_review_ranks_the_injected_flips_first_and_keeps_its_figures_for_the_models_run(reviewed):

    from mltag.data.formats import load_oof

    tmp, data, flipped, r = reviewed
    seen = {str(p) for p in load_oof(tmp / "oof.npz")["paths"]}
    visible = {f for f in flipped if f[0] in seen}  # test images have no out-of-fold score
    assert len(visible) >= 3
    lines = (tmp / "review" / "label_issues.csv").read_text().splitlines()
    assert lines[0] == "path,label,given,suggested,score,confidence"
    rows = list(csv.DictReader(lines))
    top = {(x["path"], x["label"]) for x in rows[: len(visible)]}
    # confident learning is conservative on a tiny set: it may leave a flip unflagged, never rank a clean pair first
    assert top <= visible and len(top) >= 3, (rows[:8], visible)
    conf = [float(x["confidence"]) for x in rows]
    assert conf == sorted(conf, reverse=True)
    for x in rows:
        assert x["path"] in seen and x["suggested"] == str(1 - int(x["given"]))
        assert abs(float(x["score"]) - float(x["given"])) > 0.5 or float(x["confidence"]) > 0.5
    assert json.loads((tmp / "rv.json").read_text()) == {"issues": r["issues"]}
    m = json.loads((tmp / "review" / "details.json").read_text())
    assert m["issues"] == len(rows) == r["issues"] and set(m["per_label"]) == set(COLOURS)
    assert all(0.0 <= v["noise_rate"] <= 1.0 for v in m["per_label"].values())
    html = (tmp / "review" / "review.html").read_text()
    assert all(f"<h2>{c} (" in html for c in COLOURS) and 'src="data:image/jpeg;base64,' in html
    # review.saliency (4 by default): the model's occlusion map under each of the first suggestions per label
    assert html.count('"overlay": "data:image/jpeg;base64,') == sum(min(4, sum(x["label"] == c for x in rows))
                                                                  for c in COLOURS)
    first = rows[0]["path"]
    assert f'href="../colours/{first}"' in html  # each thumbnail links to its image
    # review opens no MLflow store: its details keep the figures and files that register logs into the model's run
    from mltag.tracking.runs import step_report_logs

    kept, files = step_report_logs([tmp / "review" / "details.json"])
    assert kept["review_issues"] == len(rows) and "review_noise_rate_red" in kept
    assert sorted((Path(f).name, folder) for f, folder in files) == [
        ("details.json", "review"), ("label_issues.csv", "review"), ("review.html", "review")]


@pytest.mark.slow
def test_review_apply_round_trips_through_prepare_and_never_touches_the_original(reviewed):
    from mltag.data.formats import read_lst
    from mltag.errors import MltagError
    from mltag.steps.review import apply_review

    tmp, data, flipped, _ = reviewed
    rows = list(csv.DictReader((tmp / "review" / "label_issues.csv").read_text().splitlines()))
    accepted = [x for x in rows if (x["path"], x["label"]) in flipped]
    assert accepted
    acc = tmp / "accepted.csv"
    with acc.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(accepted)
    original = (data / "all.lst").read_bytes()
    target = apply_review(acc, data, "auto")
    assert target == data / "all.reviewed.lst" and (data / "all.lst").read_bytes() == original
    # the folder still reads as the original dataset; the corrected file reads with the fixes
    prepare(tmp / "again", **sections("prepare", input=data), progress=False)
    before = {ex.path: ex.flags for s in ("train", "val", "test") for ex in read_lst(tmp / "prepared" / f"{s}.lst")}
    again = {ex.path: ex.flags for s in ("train", "val", "test") for ex in read_lst(tmp / "again" / f"{s}.lst")}
    assert again == before
    prepare(tmp / "fixed", **sections("prepare", input=target), progress=False)
    fixed = {ex.path: ex.flags for s in ("train", "val", "test") for ex in read_lst(tmp / "fixed" / f"{s}.lst")}
    for x in accepted:
        j = COLOURS.index(x["label"])
        assert before[x["path"]][j] == int(x["given"]) and fixed[x["path"]][j] == int(x["suggested"])
    assert sum(fixed[p] != before[p] for p in before) == len({x["path"] for x in accepted})
    # applying the same rows to the corrected file: their given labels are no longer there
    with pytest.raises(MltagError, match=r"accepted.csv:2: .* not "):
        apply_review(acc, target, "auto", out=tmp / "twice.lst")
    # the CLI: prepare.input from params, a one-line answer
    (tmp / "params.yaml").write_text(f"prepare:\n  input: {data}\n")
    target.unlink()
    p = run_cli("review", "apply", "--accept", str(acc), cwd=tmp)
    assert f"corrected labels in {target}" in p.stdout and target.is_file()






@pytest.mark.slow
def test_suggest_against_a_registered_model_reuses_the_vector_store(tmp_path, fake_backbone, mlflow_store):
    from mltag.steps.register import register

    data = tmp_path / "colours"
    write_lst_dataset(data, make_colour_dataset(data, n=60))
    prepare(tmp_path / "prepared", **sections("prepare", input=data), progress=False)
    store = tmp_path / "store"
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=store, views=1), progress=False)
    train(tmp_path / "bn", tmp_path / "model", **sections("train", learning_rate=0.05, epochs=150, patience=30), progress=False)
    evaluate(tmp_path / "model", tmp_path / "bn", tmp_path / "eval", tmp_path / "ev.json", **sections("evaluate", bootstrap=20))
    calibrate(tmp_path / "eval", tmp_path / "model", tmp_path / "th.json", tmp_path / "ca.json", **sections("calibrate"), bottlenecks=tmp_path / "bn", progress=False)
    register(tmp_path / "model", tmp_path / "th.json", tmp_path / "prepared", tmp_path / "rg.json", **sections("register", model_name="active", tflite=False))
    new = tmp_path / "unlabelled"
    make_colour_dataset(new, n=12, seed=5, start=500)
    (new / "images" / "dup.jpg").write_bytes((new / "images" / "0500.jpg").read_bytes())
    (new / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")  # left out, not fatal
    (tmp_path / "params.yaml").write_text(f"bottleneck:\n  cache_dir: {store}\n")
    args = ("suggest", "--model", "models:/active@champion", "--images", str(new), "--n", "5", "--out",
            str(tmp_path / "s.csv"))
    first = run_cli(*args, cwd=tmp_path)
    assert "(12 vectors computed)" in first.stdout, first.stdout  # 13 files, one a byte-copy of another
    assert "1 unreadable image(s) left out" in first.stdout and "broken.jpg" in first.stderr
    assert first.stderr.count("broken.jpg") == 1, first.stderr
    rows = list(csv.DictReader((tmp_path / "s.csv").read_text().splitlines()))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert set(rows[0]) >= {"path", "uncertainty", "entropy", "margin", "novelty", "predicted", "score_red"}
    assert all(Path(r["path"]).is_file() for r in rows) and not any("broken" in r["path"] for r in rows)
    second = run_cli(*args, cwd=tmp_path)
    assert "(0 vectors computed)" in second.stdout, second.stdout
    assert (tmp_path / "s.csv").read_text().splitlines() == ["rank,path,uncertainty,entropy,margin,novelty,"
                                                              "predicted,score_red,score_green,score_blue"] + \
        [ln for ln in (tmp_path / "s.csv").read_text().splitlines()[1:]]


@pytest.mark.slow
def test_a_champion_whose_files_were_deleted_is_named_with_what_to_do(tmp_path, fake_backbone, mlflow_store,
                                                                      monkeypatch):
    """Registered models download into the per-user model cache under a lock; a version whose artifacts are gone
    is named, with the way out, and leaves no partial download behind."""
    import shutil
    from urllib.parse import urlparse

    from mlflow import MlflowClient

    from mltag.errors import MltagError
    from mltag.steps.register import register
    from mltag.tracking.runs import local_model, models_cache

    monkeypatch.setenv("MLTAG_MODEL_CACHE", str(tmp_path / "model-cache"))
    data = tmp_path / "colours"
    write_lst_dataset(data, make_colour_dataset(data, n=48))
    prepare(tmp_path / "prepared", **sections("prepare", input=data), progress=False)
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(fake_backbone), cache_dir=tmp_path / "store", views=1), progress=False)
    for seed in (1, 2):
        train(tmp_path / "bn", tmp_path / f"model{seed}", **sections("train", learning_rate=0.05, epochs=60, seed=seed), progress=False)
        evaluate(tmp_path / f"model{seed}", tmp_path / "bn", tmp_path / f"eval{seed}", tmp_path / f"ev{seed}.json", **sections("evaluate", bootstrap=10))
        calibrate(tmp_path / f"eval{seed}", tmp_path / f"model{seed}", tmp_path / f"th{seed}.json", tmp_path / f"ca{seed}.json", **sections("calibrate"), bottlenecks=tmp_path / "bn", progress=False)
    register(tmp_path / "model1", tmp_path / "th1.json", tmp_path / "prepared", tmp_path / "rg1.json", **sections("register", model_name="gone", tflite=False))
    assert (local_model("models:/gone@champion") / "model.json").is_file()
    assert models_cache() == tmp_path / "model-cache" and len(list(models_cache().iterdir())) >= 1
    shutil.rmtree(models_cache())

    uri = MlflowClient().get_model_version_download_uri("gone", "1")
    shutil.rmtree(urlparse(uri).path if uri.startswith("file:") else uri)
    with pytest.raises(MltagError, match=r"version 1 of gone.*artifacts are missing or unreadable.*mltag promote gone"):
        local_model("models:/gone@champion")
    with pytest.raises(MltagError, match=r"'gone' \(version 1, run .*missing or unreadable.*promote another version"):
        register(tmp_path / "model2", tmp_path / "th2.json", tmp_path / "prepared", tmp_path / "rg2.json", **sections("register", model_name="gone", tflite=False))
    assert not [p for p in models_cache().iterdir() if p.name.endswith(".partial")]


def test_a_reordered_label_list_is_refused_everywhere_even_with_its_integrity_rewritten(reviewed):
    """Case 8 and 9 of the fault list: labels.txt and model.json reordered and integrity.json rewritten with the
    project's own write_integrity make a self-consistent folder whose names are wrong. The head keeps the names it
    was trained with, so predict, evaluate and calibrate refuse it; review refuses reordered out-of-fold names."""
    import shutil

    import numpy as np

    from mltag.data.formats import load_oof, write_oof
    from mltag.data.integrity import write_integrity
    from mltag.errors import MltagError
    from mltag.inference.model import InferenceModel
    from mltag.steps.review import review

    tmp, data, _, _ = reviewed
    edited = tmp / "edited"
    shutil.copytree(tmp / "model", edited)
    meta = json.loads((edited / "model.json").read_text())
    meta["labels"] = meta["labels"][::-1]
    (edited / "model.json").write_text(json.dumps(meta))
    (edited / "labels.txt").write_text("\n".join(meta["labels"]) + "\n")
    write_integrity(edited)
    with pytest.raises(MltagError, match="same labels in another order"):
        InferenceModel(edited)
    with pytest.raises(MltagError, match="same labels in another order"):
        evaluate(edited, tmp / "bn", tmp / "eval-edited", tmp / "ev-edited.json", **sections("evaluate", bootstrap=10))
    with pytest.raises(MltagError, match="same labels in another order"):
        calibrate(tmp / "eval", edited, tmp / "th-e.json", tmp / "ca-e.json", **sections("calibrate"),
                  bottlenecks=tmp / "bn", progress=False)

    o = load_oof(tmp / "oof.npz")
    write_oof(tmp / "oof-rev.npz", o["paths"], o["labels"][:, ::-1], o["scores"][:, ::-1], o["folds"],
              list(o["label_names"])[::-1])
    with pytest.raises(MltagError, match="out-of-fold scores lists the same labels in another order"):
        review(tmp / "oof-rev.npz", tmp / "review2", tmp / "rv2.json", **sections("review"), prepared=tmp / "prepared",
               model_dir=tmp / "model")
    assert not (tmp / "review2").exists() and np.array_equal(load_oof(tmp / "oof.npz")["scores"], o["scores"])
