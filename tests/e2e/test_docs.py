"""The docs' own commands run: from the demo to your own photos, versioned with DVC
(docs/data-versioning.md, its blocks marked ``<!-- docs-test: NAME -->``), in a fresh clone."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, blank_store, colour_image

pytestmark = pytest.mark.slow
PAGE = REPO / "docs" / "data-versioning.md"


def page_blocks() -> dict[str, str]:
    """The page's marked bash blocks, by name, in page order."""
    found = re.findall(r"<!-- docs-test: ([\w-]+) -->\n```bash\n(.*?)```", PAGE.read_text(), re.S)
    return dict(found)


def run_block(name: str, blocks: dict, cwd: Path, env: dict) -> str:
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", blocks[name]], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert p.returncode == 0, f"the page's block {name!r} failed:\n{blocks[name]}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def add_photos(folder: Path, start: int, n: int, seed: int) -> None:
    """``n`` photos (solid colours, 1-2 of red/green/blue each) and their rows in labels.csv."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    new = not (folder / "labels.csv").exists()
    with open(folder / "labels.csv", "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["path", "labels"])
        for i in range(start, start + n):
            flags = (1, 0, 0) if i % 3 == 0 else (0, 1, 0) if i % 3 == 1 else (1, 0, 1)
            colour_image(flags, rng, size=48).save(folder / "images" / f"{i:04d}.jpg", quality=90)
            w.writerow([f"images/{i:04d}.jpg", " ".join(c for c, on in zip(("red", "green", "blue"), flags) if on)])


def test_the_data_versioning_page_runs_from_the_demo_to_your_own_photos(tmp_path):
    blocks = page_blocks()
    assert list(blocks) == ["demo", "first-version", "second-version", "back-to-v1", "forward-again"]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    for f in ("dvc.yaml", "params.yaml", "docs/data-versioning.md", ".gitignore"):  # the working tree's, committed or not
        (clone / f).write_text((REPO / f).read_text())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own ./mlflow.db, as a user has it
    blank_store(clone / "mlflow.db")  # (made empty here: its first step would spend 2 s making the same tables)
    # Only to make it quick: a smaller demo, the smallest backbone, fewer resamples.
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["demo"]["n_images"] = 120
    params["backbone"]["handle"] = "builtin:efficientnet_lite0"
    params["bottleneck"]["views"] = 1
    params["evaluate"]["bootstrap"] = 100
    params["register"]["bootstrap"] = 100
    (clone / "params.yaml").write_text("# yaml-language-server: $schema=docs/params.schema.json\n"
                                       + yaml.safe_dump(params, sort_keys=False))
    subprocess.run("git commit -qam 'quick settings' && dvc config core.analytics false", shell=True, cwd=clone,
                   env=env, check=True)

    out = run_block("demo", blocks, clone, env)
    assert "registry: mltag-demo version 1" in out
    add_photos(clone / "datasets" / "photos", 0, 60, seed=1)
    out = run_block("first-version", blocks, clone, env)
    reg = json.loads((clone / "reports" / "register.json").read_text())
    assert reg["model_name"] == "mltag-photos" and reg["promoted"], reg
    rows = list(csv.DictReader((clone / "predictions.csv").open()))
    assert len(rows) == 60 and not any(r["error"] for r in rows)
    assert "data-v1" in subprocess.run(["git", "tag"], cwd=clone, capture_output=True, text=True).stdout

    add_photos(clone / "datasets" / "photos", 60, 12, seed=2)
    run_block("second-version", blocks, clone, env)
    stats = json.loads((clone / "metrics" / "bottleneck.json").read_text())
    assert stats["computed"] == 12, stats

    ds = json.loads((clone / "data" / "prepared" / "dataset.json").read_text())
    assert ds["dataset_version"].startswith("dvc:photos.dvc@"), ds["dataset_version"]  # the data's, not the project's

    v2_model = (clone / "models" / "train" / "integrity.json").read_text()
    run_block("back-to-v1", blocks, clone, env)
    assert len(list((clone / "datasets" / "photos" / "images").iterdir())) == 60
    # v1's model and metrics are back, from DVC's cache and git: nothing was computed
    assert json.loads((clone / "metrics" / "bottleneck.json").read_text())["computed"] != 12  # v1's own metrics
    assert (clone / "models" / "train" / "integrity.json").read_text() != v2_model
    run_block("forward-again", blocks, clone, env)
    assert len(list((clone / "datasets" / "photos" / "images").iterdir())) == 72
    assert (clone / "models" / "train" / "integrity.json").read_text() == v2_model
    assert json.loads((clone / "metrics" / "bottleneck.json").read_text())["computed"] == 12
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert status.strip() == "", status  # nothing left over: outputs ignored or committed
