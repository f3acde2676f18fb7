"""review apply's CSV output and suggest's diversity pick."""

from __future__ import annotations

import shutil

import numpy as np


def test_review_apply_writes_a_csv_for_a_csv_or_folder_dataset(tmp_path):
    from mltag.data.datasets import detect_format, read_dataset
    from mltag.steps.review import apply_review

    root = tmp_path / "folders"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            rng = np.random.default_rng(i)
            from conftest import colour_image

            colour_image((1, 0, 0) if name == "cat" else (0, 1, 0), rng).save(root / name / f"{i}.jpg")
    acc = tmp_path / "acc.csv"
    acc.write_text("path,label,given,suggested,score,confidence\ncat/0.jpg,dog,0,1,0.9,0.9\n")
    target = apply_review(acc, root, "auto")
    assert target == root / "reviewed.csv" and detect_format(root) == "folders"
    ds = read_dataset(target, "auto")
    got = {ex.path: dict(zip(ds.labels, ex.flags)) for ex in ds.examples}
    assert got["cat/0.jpg"] == {"cat": 1, "dog": 1} and got["cat/1.jpg"] == {"cat": 1, "dog": 0}
    csv_data = tmp_path / "kaggle"
    shutil.copytree(root, csv_data, ignore=shutil.ignore_patterns("*.csv"))
    (csv_data / "data.csv").write_text("path,labels\ncat/0.jpg,cat\ncat/1.jpg,cat\ndog/0.jpg,dog\ndog/1.jpg,dog\n")
    target = apply_review(acc, csv_data, "auto")
    assert target == csv_data / "data.reviewed.csv" and detect_format(csv_data) == "csv"
    assert read_dataset(csv_data, "auto").examples[0].source.startswith(str(csv_data / "data.csv"))
    assert "cat/0.jpg,cat dog" in target.read_text()


def test_pick_diverse_skips_near_duplicates_of_a_pick():
    from mltag.tools.suggest import pick_diverse, uncertainty

    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 16))
    vectors = np.concatenate([np.repeat(base[:1], 5, axis=0) + 1e-4 * rng.normal(size=(5, 16)), base[1:]])
    u = np.array([0.9, 0.89, 0.88, 0.87, 0.86, 0.5, 0.45, 0.4, 0.35, 0.3])
    picks, novelty = pick_diverse(u, vectors, 3)
    assert picks[0] == 0 and not set(picks[1:]) & {1, 2, 3, 4}, picks
    assert novelty[0] == 1.0 and all(0 < x <= 1 for x in novelty)
    t = np.array([0.5, 0.3])
    out = uncertainty(np.array([[0.5, 0.9], [0.99, 0.01]]), t)
    assert out["entropy"][0] > out["entropy"][1] and out["margin"][0] == 0.0
    assert out["uncertainty"][0] > out["uncertainty"][1]


def test_labels_go_to_cleanlab_a_few_at_a_time_with_the_same_result(monkeypatch):
    """#51: review on 500 labels ran 12 minutes without a word; the labels now go to cleanlab in chunks under a
    progress bar. Each label is its own binary problem, so the chunks change nothing."""
    import numpy as np

    import mltag.steps.review as review

    rng = np.random.default_rng(0)
    y = (rng.random((400, 23)) < 0.1).astype(int)
    y[:, 4] = 0  # a label without positives: not usable, as before
    s = np.clip(y * 0.6 + rng.random(y.shape) * 0.5, 0, 1)
    flips = rng.random(y.shape) < 0.03
    flips[:, 4] = False
    y = np.where(flips, 1 - y, y)  # given labels that the scores contradict
    monkeypatch.setattr(review, "CHUNK", 1000)
    whole = review.find_issues(y, s, "prune_by_noise_rate")
    monkeypatch.setattr(review, "CHUNK", 3)
    chunked = review.find_issues(y, s, "prune_by_noise_rate", progress=True)
    assert all(np.array_equal(a, b) for a, b in zip(whole, chunked)) and whole[0].any()
