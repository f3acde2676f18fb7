"""The experiment loop on real photos: `dvc repro`, then a one-key `dvc exp run` that reruns only what the key
changes, a `dvc exp show` a person can read, `dvc metrics diff` as the docs say, and a registry and MLflow that
an exploratory experiment leaves navigable and untouched."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO, blank_store

pytestmark = pytest.mark.slow

# skimage's sample photos (real photos, shipped in a PyPI package) and what is in each
PHOTOS = {"astronaut": "person space", "coffee": "food object", "chelsea": "animal", "cat": "animal",
          "rocket": "space outdoor", "hubble_deep_field": "space", "camera": "person grey outdoor",
          "moon": "space grey", "brick": "texture grey", "grass": "texture grey outdoor", "gravel": "texture grey",
          "coins": "object grey", "clock": "object grey", "immunohistochemistry": "texture"}


def real_photo_dataset(root: Path, per_photo: int = 6) -> Path:
    """``per_photo`` random crops (half to all of the photo, some mirrored) of each sample photo, with its
    labels, as a CSV dataset: real pixels, several labels each, and errors for the gallery to show."""
    from skimage import data

    rng = np.random.default_rng(0)
    rows = []
    (root / "images").mkdir(parents=True)
    for name, labels in PHOTOS.items():
        im = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = im.size
        for i in range(per_photo):
            f = rng.uniform(0.5, 1.0)
            cw, ch = int(w * f), int(h * f)
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            crop = im.crop((x, y, x + cw, y + ch))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            path = f"images/{name}-{i}.jpg"
            crop.save(root / path, quality=90)
            rows.append((path, labels))
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "labels"])
        w.writerows(rows)
    return root / "labels.csv"


def sh(cmd: str, cwd: Path, env: dict) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500, shell=True)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


def test_a_one_key_experiment_reruns_only_the_head_and_shows_a_readable_table(tmp_path):
    d = tmp_path / "proj"
    d.mkdir()
    for f in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / f, d / f)
    real_photo_dataset(d / "datasets" / "samples")
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["prepare"]["input"] = "datasets/samples/labels.csv"
    params["backbone"]["handle"] = "builtin:efficientnet_lite0"  # the smallest real backbone: the same code path
    params["bottleneck"]["views"] = 2
    params["evaluate"]["bootstrap"] = 100
    params["register"]["bootstrap"] = 100
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": blank_store(d / "mlflow.db"), "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    sh("git init -q && dvc init -q && dvc config core.analytics false && git add -A && git commit -qm init", d, env)
    sh("dvc repro", d, env)
    # as docs/experiments.md says: commit dvc.lock, params.yaml and metrics/
    sh("git add dvc.lock params.yaml metrics && git commit -qm baseline", d, env)
    assert "failed to load" not in sh("dvc metrics diff", d, env)

    out = sh("dvc exp run -n faster -S train.learning_rate=0.003", d, env)
    ran = re.findall(r"Running stage '([\w-]+)'", out)
    assert sorted(set(ran) - {"code"}) == ["calibrate", "evaluate", "register", "review", "train"], ran
    # what moved, as docs/experiments.md compares it: the train summary always moves with the learning rate
    diff = json.loads(sh("dvc metrics diff --json", d, env))
    assert "val_loss" in diff["metrics/train.json"], diff
    assert "train.learning_rate" in sh("dvc params diff", d, env)
    sh("dvc plots diff -o plots_html", d, env)
    assert (d / "plots_html" / "index.html").is_file()
    shown = sh("dvc exp show --only-changed --no-pager --csv", d, env)
    header = next(csv.reader(io.StringIO(shown)))
    assert len(header) <= 25, header
    # the key set, and the figures it moved (the loss always moves with the learning rate)
    assert any(c.endswith("learning_rate") for c in header) and "val_loss" in header, header
    assert not [c for c in header if "per_label" in c or c.startswith("ci95") or c == "run_id"], header

    # the experiment decided, but touched nothing in the registry
    reg = json.loads((d / "metrics" / "register.json").read_text())
    assert reg["version"] is None and reg["promoted"] == 0 and reg["gate_passed"] in (0, 1), reg
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{d / 'mlflow.db'}")
    versions = client.search_model_versions("name='mltag-samples'")
    assert [str(v.version) for v in versions] == ["1"], versions
    assert str(client.get_model_version_by_alias("mltag-samples", "champion").version) == "1"
    # one MLflow experiment for this dataset, runs named after what they are
    exp = client.get_experiment_by_name("mltag-samples")
    runs = {r.data.tags.get("mlflow.runName"): r for r in client.search_runs([exp.experiment_id])}
    assert "samples/faster" in runs, list(runs)
    tags = runs["samples/faster"].data.tags
    assert tags["mltag.dvc_experiment"] == "faster" and len(tags["mltag.git_commit"]) == 40
    assert any(name.startswith("samples@") for name in runs), list(runs)
    # every plot the docs point to is a picture too
    for png in ("reports/evaluate/pr_curves.png", "reports/evaluate/train_history.png"):
        assert (d / png).read_bytes()[:4] == b"\x89PNG", png

    # the chosen experiment, registered as the docs say
    sh("dvc exp apply faster && dvc repro --force --single-item register", d, env)
    reg = json.loads((d / "metrics" / "register.json").read_text())
    assert reg["version"] == 2, reg
    assert len(client.search_model_versions("name='mltag-samples'")) == 2
