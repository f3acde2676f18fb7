"""End to end: the real dvc.yaml in a fresh clone, the real built-in backbone, MLflow in SQLite. One demo run
(docs/data-versioning.md's first block) is built once and copied for each test: the docs' own commands from the
demo to your own photos, the experiment loop as docs/experiments.md tells it, adding images, code changes."""

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

from conftest import REPO, blank_store, colour_image, run_cli

pytestmark = pytest.mark.slow


def sh(cmd, cwd, env):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500, shell=True)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


def stages_run(out: str) -> list[str]:
    """The stages DVC ran, but the code stage, which runs every time (it digests the code each step runs)."""
    return [s for s in re.findall(r"Running stage '([\w-]+)'", out) if s != "code"]


PAGE = REPO / "docs" / "data-versioning.md"


def page_blocks() -> dict[str, str]:
    """docs/data-versioning.md's marked bash blocks (``<!-- docs-test: NAME -->``), by name, in page order."""
    found = re.findall(r"<!-- docs-test: ([\w-]+) -->\n```bash\n(.*?)```", PAGE.read_text(), re.S)
    return dict(found)


def run_block(name: str, cwd: Path, env: dict) -> str:
    block = page_blocks()[name]
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert p.returncode == 0, f"the page's block {name!r} failed:\n{block}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


DEMO_IMAGES = 120


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A fresh clone of this repository after the docs' first block (`dvc repro` of the demo, every step, then
    `mltag metrics`), as a user has it: its own ./mlflow.db, nothing committed since. Built once for the module
    (a minute of work); every test here works on its own copy."""
    d = tmp_path_factory.mktemp("clone") / "proj"
    subprocess.run(["git", "clone", "-q", str(REPO), str(d)], check=True)
    for f in ("dvc.yaml", "params.yaml", "docs/data-versioning.md", ".gitignore"):  # the working tree's, committed or not
        (d / f).write_text((REPO / f).read_text())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own ./mlflow.db, as a user has it
    blank_store(d / "mlflow.db")  # (made empty here: its first step would spend 2 s making the same tables)
    # Only to make it quick: a smaller demo, the smallest real built-in backbone (2.2x fewer FLOPs than the default
    # Lite2: the same code path end to end; Lite2 itself is checked on real photos in tests/integration), augmented
    # views still made and cached (2, half the default's vectors), fewer resamples.
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["demo"]["n_images"] = DEMO_IMAGES
    params["backbone"]["handle"] = "builtin:efficientnet_lite0"
    params["bottleneck"]["views"] = 2
    params["evaluate"]["bootstrap"] = 100
    params["register"]["bootstrap"] = 100
    (d / "params.yaml").write_text("# yaml-language-server: $schema=docs/params.schema.json\n"
                                   + yaml.safe_dump(params, sort_keys=False))
    sh("git commit -qam 'quick settings' && dvc config core.analytics false", d, env)
    out = run_block("demo", d, env)
    return d, env, out


@pytest.fixture
def project(first_run, tmp_path):
    """Each test's own copy of the first run's project (git, DVC cache, vector store, mlflow.db): what one
    test changes no other test sees, whatever their order."""
    src, env, out = first_run
    d = tmp_path / "proj"
    shutil.copytree(src, d, symlinks=True)
    return d, env, out


def test_repro_registers_a_predicting_champion(project):
    d, env, out = project
    ran = stages_run(out)
    assert "registry: mltag-demo version 1" in out  # the page's `mltag metrics` and register's line
    assert ran[:6] == ["demo-data", "prepare", "bottleneck", "train", "evaluate", "calibrate"], ran
    assert sorted(ran[6:]) == ["register", "review"], ran  # both need calibrate; review never gates register
    issues = (d / "reports" / "review" / "label_issues.csv").read_text().splitlines()
    assert issues[0] == "path,label,given,suggested,score,confidence"
    assert json.loads((d / "reports" / "review" / "details.json").read_text())["images"] > 0
    # no third-party warning or chatter lines (pkg_resources, KFP, MLflow's "Successfully registered")
    noise = [ln for ln in out.splitlines() if re.search(r"Warning|warn\(|deprecat|Successfully registered|Created "
                                                        r"version|View run", ln)]
    assert not noise, noise
    ev = json.loads((d / "metrics" / "evaluate.json").read_text())
    assert ev["map"] >= 0.9, ev["map"]
    reg = json.loads((d / "reports" / "register.json").read_text())
    assert reg["promoted"] and "champion" in reg["aliases"]
    lst = (d / "data" / "demo" / "all.lst").read_text().splitlines()
    labels = (d / "data" / "demo" / "labels.txt").read_text().split()
    cols = lst[1].split("\t")
    truth = [lb for lb, f in zip(labels, cols[1:-1]) if f == "1"]
    p = run_cli("predict", "--json", str(d / "data" / "demo" / cols[-1]), cwd=d, env=env)
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["labels"] == truth


def test_second_repro_runs_nothing(project):
    d, env, _ = project
    out = sh("dvc repro", d, env)
    assert stages_run(out) == [] and "Running stage 'code'" in out


def test_a_code_change_reruns_the_steps_whose_code_changed(project):
    """What the code stage wrote is what a stage depends on: a prepare digest other than the one dvc.lock recorded
    (as after an edit of the split code, or an upgrade of mltag) makes prepare and what follows stale, and DVC's run
    cache cannot hand back what the older code made."""
    d, env, _ = project
    assert (d / ".mltag-code" / "prepare").read_text().strip() == \
        json.loads(subprocess.run([sys.executable, "-c", "import json; from mltag.tools.codedigest import "
                                   "code_digests; print(json.dumps(code_digests()))"], capture_output=True,
                                  text=True, check=True).stdout)["prepare"]
    # the code stage as it runs after an edit of prepare's code: prepare's digest comes out another
    dvc_yaml = yaml.safe_load((d / "dvc.yaml").read_text())
    dvc_yaml["stages"]["code"]["cmd"] += " && echo feed > .mltag-code/prepare"
    (d / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    out = sh("dvc repro", d, env)
    assert stages_run(out)[:1] == ["prepare"], out[-3000:]
    assert "is cached - skipping run" not in out.split("Running stage 'prepare'")[0], out[-3000:]
    assert "Stage 'bottleneck' didn't change" in out or "bottleneck" in stages_run(out)


def test_exp_run_temp_finds_the_models_run_from_its_metadata(project):
    """`dvc exp run --temp` runs in a fresh workspace with its own ./mlflow.db: train comes from the
    DVC cache, its run lives in the first workspace's store, and register (the step that logs) must still find a
    run to log into."""
    d, env, _ = project
    sh("git add -A && git commit -qm 'before temp exp' --allow-empty", d, env)
    out = sh("dvc exp run --temp -n tempeval -S register.bootstrap=200", d, env)
    ran = stages_run(out)  # (calibrate too: its uncached report is not in the fresh workspace)
    assert "register" in ran and not {"train", "evaluate"} & set(ran), out[-3000:]
    assert "is not in sqlite:///" in out and "logging into run" in out, out[-3000:]
    rows = json.loads(sh("dvc exp show --json 2>/dev/null", d, env))
    assert '"tempeval"' in json.dumps(rows)


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


def test_the_data_versioning_page_runs_from_the_demo_to_your_own_photos(project):
    """docs/data-versioning.md's blocks, in page order, after its first (the demo: the fixture's run)."""
    d, env, _ = project
    assert list(page_blocks()) == ["demo", "first-version", "second-version", "back-to-v1", "forward-again"]
    add_photos(d / "datasets" / "photos", 0, 60, seed=1)
    run_block("first-version", d, env)
    reg = json.loads((d / "reports" / "register.json").read_text())
    assert reg["model_name"] == "mltag-photos" and reg["promoted"], reg
    rows = list(csv.DictReader((d / "predictions.csv").open()))
    assert len(rows) == 60 and not any(r["error"] for r in rows)
    assert "data-v1" in subprocess.run(["git", "tag"], cwd=d, capture_output=True, text=True).stdout

    add_photos(d / "datasets" / "photos", 60, 12, seed=2)
    out = run_block("second-version", d, env)
    assert "bottleneck" in stages_run(out)
    # only the 12 new photos' vectors, plus views-1 augmented views of those that landed in train; run statistics
    # live outside the output (metrics/), so an unchanged dataset gives a byte-identical output
    summary = json.loads((d / "data" / "bottlenecks" / "bottleneck.json").read_text())
    stats = json.loads((d / "metrics" / "bottleneck.json").read_text())
    assert "computed" not in summary and summary["views"] == 2, summary
    train = [int(line.rsplit("/", 1)[-1].split(".")[0])
             for line in (d / "data" / "prepared" / "train.lst").read_text().splitlines() if line.strip()]
    new_train = sum(i >= 60 for i in train)
    assert (stats["computed"], stats["cached"]) == (12 + new_train, 60 + len(train) - new_train), stats
    computed_v2 = stats["computed"]

    ds = json.loads((d / "data" / "prepared" / "dataset.json").read_text())
    assert ds["dataset_version"].startswith("dvc:photos.dvc@"), ds["dataset_version"]  # the data's, not the project's

    v2_model = (d / "models" / "train" / "integrity.json").read_text()
    run_block("back-to-v1", d, env)
    assert len(list((d / "datasets" / "photos" / "images").iterdir())) == 60
    # v1's model and metrics are back, from DVC's cache and git: nothing was computed
    assert json.loads((d / "metrics" / "bottleneck.json").read_text())["computed"] != computed_v2  # v1's own metrics
    assert (d / "models" / "train" / "integrity.json").read_text() != v2_model
    run_block("forward-again", d, env)
    assert len(list((d / "datasets" / "photos" / "images").iterdir())) == 72
    assert (d / "models" / "train" / "integrity.json").read_text() == v2_model
    assert json.loads((d / "metrics" / "bottleneck.json").read_text())["computed"] == computed_v2
    status = subprocess.run(["git", "status", "--porcelain"], cwd=d, capture_output=True, text=True).stdout
    assert status.strip() == "", status  # nothing left over: outputs ignored or committed


def test_a_one_key_experiment_reruns_only_the_head_and_shows_a_readable_table(project):
    """The experiment loop: after `dvc repro`, a one-key `dvc exp run` that reruns only what the key changes, a
    `dvc exp show` a person can read, `dvc metrics diff` as the docs say, and a registry and MLflow that an
    exploratory experiment leaves navigable and untouched; then the chosen experiment registered."""
    d, env, _ = project
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
    versions = client.search_model_versions("name='mltag-demo'")
    assert [str(v.version) for v in versions] == ["1"], versions
    assert str(client.get_model_version_by_alias("mltag-demo", "champion").version) == "1"
    # one MLflow experiment for this dataset, runs named after what they are
    exp = client.get_experiment_by_name("mltag-demo")
    runs = {r.data.tags.get("mlflow.runName"): r for r in client.search_runs([exp.experiment_id])}
    assert "demo/faster" in runs, list(runs)
    tags = runs["demo/faster"].data.tags
    assert tags["mltag.dvc_experiment"] == "faster" and len(tags["mltag.git_commit"]) == 40
    assert any(name.startswith("demo@") for name in runs), list(runs)
    # every plot the docs point to is a picture too
    for png in ("reports/evaluate/pr_curves.png", "reports/evaluate/train_history.png"):
        assert (d / png).read_bytes()[:4] == b"\x89PNG", png

    # the chosen experiment, registered as the docs say
    sh("dvc exp apply faster && dvc repro --force --single-item register", d, env)
    reg = json.loads((d / "metrics" / "register.json").read_text())
    assert reg["version"] == 2, reg
    assert len(client.search_model_versions("name='mltag-demo'")) == 2
