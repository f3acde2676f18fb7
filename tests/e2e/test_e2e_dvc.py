"""End to end: the real dvc.yaml in a temp git repo, the real built-in backbone, MLflow in SQLite."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, blank_store, run_cli

pytestmark = pytest.mark.slow


def sh(cmd, cwd, env):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500, shell=True)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


def set_param(d: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((d / "params.yaml").read_text())
    params[section][key] = value
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stages_run(out: str) -> list[str]:
    """The stages DVC ran, but the code stage, which runs every time (it digests the code each step runs)."""
    return [s for s in re.findall(r"Running stage '([\w-]+)'", out) if s != "code"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One project after its first `dvc repro` (a minute of work), built once for the module."""
    d = tmp_path_factory.mktemp("proj")
    for f in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / f, d / f)
    params = yaml.safe_load((d / "params.yaml").read_text())
    params["demo"]["n_images"] = 160
    params["evaluate"]["bootstrap"] = 200
    # The smallest real built-in backbone (2.2x fewer FLOPs than the default Lite2, and a smaller
    # graph to export): the same code path end to end. Lite2 itself is checked on real photos in
    # test_backbone.py and test_engine.py.
    params["backbone"]["handle"] = "builtin:efficientnet_lite0"
    params["bottleneck"]["views"] = 2  # augmented views still made and cached, half the vectors of the default 4
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MLFLOW_TRACKING_URI"] = blank_store(d / "mlflow.db")
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com")
    sh("git init -q && dvc init -q && dvc config core.analytics false && git add -A && git commit -qm init", d, env)
    out = sh("dvc repro", d, env)
    sh("git add -A && git commit -qm 'first run'", d, env)  # metrics and dvc.lock, as a user would
    return d, env, out


@pytest.fixture
def project(first_run, tmp_path):
    """Each test's own copy of the first run's project (git, DVC cache, vector store, mlflow.db): what one
    test changes no other test sees, whatever their order."""
    src, env, out = first_run
    d = tmp_path / "proj"
    shutil.copytree(src, d, symlinks=True)
    return d, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{d / 'mlflow.db'}"}, out


def test_repro_registers_a_predicting_champion(project):
    d, env, out = project
    ran = stages_run(out)
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


def test_adding_images_computes_only_their_bottlenecks(project):
    d, env, _ = project
    set_param(d, "demo", "n_images", 172)
    out = sh("dvc repro", d, env)
    assert "bottleneck" in stages_run(out)
    summary = json.loads((d / "data" / "bottlenecks" / "bottleneck.json").read_text())
    stats = json.loads((d / "metrics" / "bottleneck.json").read_text())  # run statistics live outside the output
    assert "computed" not in summary
    # The 12 new images' plain vectors, plus views-1 augmented views of those that landed in train.
    extra = summary["views"] - 1
    train = sum(1 for line in (d / "data" / "prepared" / "train.lst").read_text().splitlines() if line.strip())
    new_train = sum(1 for line in (d / "data" / "prepared" / "train.lst").read_text().splitlines()
                    if line.strip() and int(line.rsplit("/", 1)[-1].split(".")[0]) >= 160)
    assert (stats["computed"], stats["cached"]) == (12 + extra * new_train, 160 + extra * (train - new_train))


def test_exp_run_temp_finds_the_models_run_from_its_metadata(project):
    """`dvc exp run --temp` runs in a fresh workspace with its own ./mlflow.db: train comes from the
    DVC cache, its run lives in the first workspace's store, and evaluate must still find a run."""
    d, env, _ = project
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # the local default: ./mlflow.db
    sh("git add -A && git commit -qm 'before temp exp' --allow-empty", d, env)
    out = sh("dvc exp run --temp -n tempeval -S evaluate.bootstrap=30", d, env)
    # register runs too unless calibrate's thresholds came out the same as before
    assert stages_run(out)[:2] == ["evaluate", "calibrate"], out[-3000:]
    assert "is not in sqlite:///" in out and "logging into run" in out, out[-3000:]
    rows = json.loads(sh("dvc exp show --json 2>/dev/null", d, env))
    assert '"tempeval"' in json.dumps(rows)
