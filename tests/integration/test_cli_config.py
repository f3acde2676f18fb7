"""The config through real processes: flags over params.yaml, and the wheel installed elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli


def test_flags_override_params_and_the_resolved_config_is_saved_with_the_output(tmp_path, colour_dataset):
    (tmp_path / "params.yaml").write_text(f"prepare:\n  input: {colour_dataset}\n  salt: from-file\n")
    run_cli("prepare", "--out", str(tmp_path / "p"), "--val-fraction", "0.2", "--prepare.test_fraction", "0.25",
            cwd=tmp_path)
    saved = json.loads((tmp_path / "p" / "dataset.json").read_text())["config"]["prepare"]
    assert (saved["val_fraction"], saved["test_fraction"], saved["salt"]) == (0.2, 0.25, "from-file")
    p = run_cli("prepare", "--out", str(tmp_path / "q"), "--val-fraction", "lots", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "prepare.val_fraction: must be a number, got 'lots'" in p.stderr


@pytest.mark.slow
def test_wheel_installs_without_generic_packages_and_compiles_from_anywhere(tmp_path):
    """pip install . ships mltag only, and `mltag pipeline compile --params` needs no checkout."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True)
    wheel = next(wheels.glob("mltag-*.whl"))
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"mltag"}
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    (tmp_path / "my-params.yaml").write_text("train:\n  epochs: 7\nbottleneck:\n  num_shards: 3\n")
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    code = ("import sys, mltag; assert mltag.__file__.startswith(sys.argv[1]), mltag.__file__;"
            "from mltag.cli import main; sys.exit(main(sys.argv[2:]))")
    p = subprocess.run([sys.executable, "-c", code, str(target), "pipeline", "compile", "--params",
                        str(tmp_path / "my-params.yaml"), "--out", "compiled.yaml"], cwd=work, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    spec, _ = yaml.safe_load_all((work / "compiled.yaml").read_text())
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["train"]["defaultValue"]["epochs"] == 7 and inputs["bottleneck"]["defaultValue"]["num_shards"] == 3
    assert not (target / "pipeline").exists() and not (target / "components").exists()
    assert Path(work / "compiled.yaml").is_file()


def test_prepare_s_line_names_duplicates_conflicts_image_sizes_and_upscaling(tmp_path, colour_dataset):
    """#54: prepare's line said nothing of what its report knew: identical images under two names (one pair with
    other labels), every image 24 px and upscaled to the default backbone's 325 px."""
    import shutil

    lines = (colour_dataset / "all.lst").read_text().splitlines()
    idx, *flags, path = lines[0].split("\t")
    shutil.copy(colour_dataset / path, colour_dataset / "images" / "copy.jpg")
    other = ["0" if f == "1" else "1" for f in flags]
    (colour_dataset / "all.lst").write_text("\n".join(lines + ["\t".join(["999", *other, "images/copy.jpg"])]) + "\n")
    out = run_cli("prepare", "--input", str(colour_dataset), "--out", str(tmp_path / "p"), cwd=tmp_path).stdout
    assert "1 group(s) of identical images under other names; 1 with conflicting labels, e.g. " in out, out
    assert "images/copy.jpg" in out and "short side 24-24 px (median 24)" in out, out
    assert "WARNING: most images are under half the backbone's 325 px input and will be upscaled" in out, out
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert len(report["conflicting_duplicates"]) == 1 and report["image_short_side"]["median"] == 24


def test_the_dataset_version_is_the_data_s_own_never_the_project_s_commit(tmp_path, colour_dataset):
    """#54: following the README, dataset.json recorded the project's commit, which did not hold the dataset. Now:
    the md5 `dvc add` recorded, or the commit of a git repo that holds the folder unchanged, or 'untracked'."""
    from mltag.data.fetch import dataset_version_of

    assert dataset_version_of(str(colour_dataset)).startswith("untracked (manifest-")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}
    git = dict(cwd=tmp_path, check=True, capture_output=True, env={**os.environ, **env})
    subprocess.run(["git", "init", "-q"], **git)
    (tmp_path / "notes.txt").write_text("the project, not the data\n")
    subprocess.run(["git", "add", "notes.txt"], **git)
    subprocess.run(["git", "commit", "-qm", "project"], **git)
    assert dataset_version_of(str(colour_dataset)).startswith("untracked (")  # the commit does not hold it
    subprocess.run(["git", "add", "colours"], **git)
    subprocess.run(["git", "commit", "-qm", "data"], **git)
    head = subprocess.run(["git", "rev-parse", "HEAD"], **git, text=True).stdout.strip()
    assert dataset_version_of(str(colour_dataset / "all.lst")) == f"git:{head}"
    (tmp_path / "colours.dvc").write_text("outs:\n- md5: 0123abcd.dir\n  size: 10\n  nfiles: 49\n  path: colours\n")
    assert dataset_version_of(str(colour_dataset / "all.lst")) == "dvc:colours.dvc@0123abcd.dir"
    out = run_cli("prepare", "--input", str(colour_dataset), "--out", str(tmp_path / "p"), cwd=tmp_path)
    assert json.loads((tmp_path / "p" / "dataset.json").read_text())["dataset_version"] == \
        "dvc:colours.dvc@0123abcd.dir", out.stdout
