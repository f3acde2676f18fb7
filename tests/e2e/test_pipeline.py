"""The Kubeflow pipeline: compiled YAML checked, and the whole DAG run with kfp.local."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO


def _stats(root: Path) -> tuple[list[dict], dict]:
    """The shards' and the gather's run statistics from one kfp.local run's artifacts."""

    found = {f: json.loads(f.read_text()) for f in root.rglob("stats.json")}
    shards = [v for f, v in found.items() if "bottleneck-shard" in str(f)]
    (gather,) = [v for f, v in found.items() if "bottleneck-shard" not in str(f)]
    return shards, gather


@pytest.mark.slow
def test_full_pipeline_runs_locally_cached_then_with_new_images_computing_only_those(tmp_path, fake_backbone,
                                                                                     mlflow_store, monkeypatch):
    """`mltag pipeline run --local --cache` prints about 20 lines, not kfp.local's hundreds, and its two bottleneck
    shards split the work by key hash, reading the images in place; the same run again reuses the cached tasks
    (the dataset version and register always run). Then a run sharing the vector store folder, with 10% more
    images, computes only those, in its shards, and the gather computes nothing; that run uses the fan-in for
    older backends (pipeline.collect_shards false) and reads its dataset by reference from a git+DVC repo
    (data_repo + data_rev): prepare resolves the revision to its commit, no artifact holds an image, and every
    later step reads the images it needs from the repo at that commit."""

    from mlflow import MlflowClient

    from conftest import make_colour_dataset, run_cli, write_lst_dataset
    from mltag.config import load_params
    from mltag.kubeflow.run import run_local

    data, rows = tmp_path / "colours", []
    rows += make_colour_dataset(data, n=40)
    write_lst_dataset(data, rows)
    store = tmp_path / "store"
    # section.key overrides over the compiled params, as `mltag pipeline run --arg` passes them
    overrides = {"backbone.handle": str(fake_backbone), "bottleneck.num_shards": "2",
                 "bottleneck.cache_dir": str(store), "bottleneck.views": "1", "train.learning_rate": "0.05",
                 "evaluate.bootstrap": "20", "register.model_name": "kfp-model", "train.patience": "30",
                 "evaluate.seed": "3"}
    args = ["pipeline", "run", "--local", "--cache", "--data", str(data), "--pipeline-root", str(tmp_path / "run1"),
            "--params", str(REPO / "params.yaml")]
    for kv in overrides.items():
        args += ["--arg", "=".join(kv)]
    first = run_cli(*args, cwd=tmp_path)
    lines = (first.stdout + first.stderr).splitlines()
    assert len(lines) <= 20, "\n".join(lines)
    assert "Executor input" not in first.stdout and "Warning" not in first.stderr, first.stderr
    tasks = [ln.split() for ln in first.stdout.splitlines() if ln.startswith("  ")]
    names = [t[0] for t in tasks]
    assert {"prepare", "train", "evaluate", "calibrate", "register"} <= set(names), first.stdout
    assert all(t[1] == "SUCCESS" and t[-1] == "computed" for t in tasks), first.stdout
    assert f"{len(tasks)} tasks succeeded ({len(tasks)} computed, 0 cached)" in first.stdout
    client = MlflowClient()
    mv = client.get_model_version_by_alias("kfp-model", "champion")
    run = client.get_run(mv.run_id)
    assert run.data.metrics["test_map"] >= 0.9
    assert "calibrated_test_micro_f1" in run.data.metrics  # evaluate and calibrate logged into train's run
    shards, gather = _stats(tmp_path / "run1")
    assert len(shards) == 2 and sum(s["computed"] for s in shards) == 40 and gather["computed"] == 0
    assert all(s["computed"] > 0 for s in shards)  # split by key hash, both shards get work
    assert not list((tmp_path / "run1").rglob("source"))  # by reference: no copy of the dataset
    images = [json.loads(f.read_text()) for f in (tmp_path / "run1").rglob("images.json")]
    assert images == [{"format": 1, "root": str(data.resolve()), "repo": "", "rev": ""}]

    second = run_cli(*args, cwd=tmp_path)
    again = {t[0]: t[-1] for t in (ln.split() for ln in second.stdout.splitlines() if ln.startswith("  "))}
    assert again["prepare"] == again["bottleneck-shard"] == again["bottleneck"] == "cached", second.stdout
    assert again["resolve-data"] == again["register"] == "computed", second.stdout  # never cached

    rows += make_colour_dataset(data, n=4, seed=7, start=40)
    write_lst_dataset(data, rows)
    # The third run as compiled for a backend without dsl.Collected (the gather reads the store only), its data the
    # 44 images as v1 of a git+DVC repo (v2, the branch head, renames the labels), by reference.
    repo, v1 = make_dvc_data_repo(tmp_path, data)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "pods"))  # the steps' scratch space
    (tmp_path / "pods").mkdir()
    older_backend = load_params(REPO / "params.yaml").replace("pipeline", collect_shards=False)
    run_local(data="colours", data_repo=str(repo), data_rev=v1, pipeline_root=str(tmp_path / "run2"),
              params=older_backend, overrides=overrides)
    shards, gather = _stats(tmp_path / "run2")
    assert sum(s["computed"] for s in shards) == 4 and sum(s["cached"] for s in shards) == 40
    assert gather["computed"] == 0 and gather["cached"] == 44
    versions = client.search_model_versions("name='kfp-model'")
    assert len(versions) == 2
    latest = max(versions, key=lambda v: int(v.version))
    assert client.get_run(latest.run_id).data.metrics["test_map"] >= 0.9
    (ref,) = [json.loads(f.read_text()) for f in (tmp_path / "run2").rglob("images.json")]
    assert ref == {"format": 1, "root": "colours", "repo": str(repo), "rev": v1}
    assert not [p for p in (tmp_path / "run2").rglob("*.jpg")], "an artifact holds images"
    (prepared_labels,) = (tmp_path / "run2").rglob("prepared/labels.txt")
    assert prepared_labels.read_text().split() == ["red", "green", "blue"]  # v1, not the branch head


def make_dvc_data_repo(tmp_path: Path, dataset: Path) -> tuple[Path, str]:
    """A git+DVC repo holding ``dataset`` as ``colours`` (v1, pushed to a local remote), then a v2 whose
    labels.txt is renamed; returns the repo and v1's commit."""
    import shutil

    repo = tmp_path / "datarepo"
    repo.mkdir()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@e.com", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@e.com")

    def sh(cmd):
        subprocess.run(cmd, shell=True, cwd=repo, env=env, check=True, capture_output=True)

    shutil.copytree(dataset, repo / "colours")
    sh("git init -q && dvc init -q && dvc config core.analytics false && "
       f"dvc remote add -d store {tmp_path / 'remote'} && dvc add -q colours && git add -A && "
       "git commit -qm v1 && dvc push -q")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    (repo / "colours" / "labels.txt").write_text("r\ng\nb\n")
    sh("dvc add -q colours && git commit -qam v2 && dvc push -q")
    return repo, commit


@pytest.mark.slow
def test_dvc_versioned_dataset_is_fetched_at_a_revision(tmp_path, colour_dataset):
    """prepare's data source: a git+DVC repo at a revision, recorded as repo@commit."""
    from mltag.data.fetch import ImageSource, fetch_dataset, resolve_version
    from mltag.errors import MltagError

    repo, commit = make_dvc_data_repo(tmp_path, colour_dataset)
    version = resolve_version("colours", str(repo), commit)  # what the pipeline records and fetches
    assert version == f"{repo}@{commit}"
    got = fetch_dataset("colours", str(repo), version.rpartition("@")[2], tmp_path / "fetched")
    assert (got / "labels.txt").read_text().split() == ["red", "green", "blue"]
    assert len(list((got / "images").iterdir())) == 48
    got2 = fetch_dataset("colours", str(repo), "", tmp_path / "fetched2")
    assert (got2 / "labels.txt").read_text().split() == ["r", "g", "b"]
    # By reference: a step downloads only the images it names, at the recorded commit.
    src = ImageSource("colours", str(repo), commit, scratch=tmp_path / "scratch")
    root = src.localize(["images/0003.jpg", "images/0007.jpg"])
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "images/0003.jpg", "images/0007.jpg"]
    assert (root / "images/0003.jpg").read_bytes() == (colour_dataset / "images/0003.jpg").read_bytes()
    with pytest.raises(MltagError, match="image images/9999.jpg not found in"):
        src.localize(["images/9999.jpg"])


def test_a_mutable_reference_resolves_to_an_immutable_version_and_prepare_is_cached_only_on_it(tmp_path, compiled):
    """A branch resolves to its commit now; when the branch moves, the version (prepare's cache key) moves."""
    from mltag.data.fetch import resolve_version

    repo = tmp_path / "datarepo"
    repo.mkdir()
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@e.com")

    def git(cmd):
        return subprocess.run(f"git {cmd}", shell=True, cwd=repo, env=env, check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init -q -b main")
    (repo / "a.txt").write_text("1")
    git("add -A && git commit -qm v1")
    v1 = git("rev-parse HEAD")
    assert resolve_version("data", str(repo), "main") == f"{repo}@{v1}"
    assert resolve_version("data", str(repo), "") == f"{repo}@{v1}"
    (repo / "a.txt").write_text("2")
    git("commit -qam v2")
    v2 = git("rev-parse HEAD")
    assert v2 != v1 and resolve_version("data", str(repo), "main") == f"{repo}@{v2}"
    assert resolve_version("data", str(repo), v1) == f"{repo}@{v1}"  # a commit id stays itself
    git("tag -a t1 -m t1 " + v1)
    assert resolve_version("data", str(repo), "t1") == f"{repo}@{v1}"
    from mltag.errors import MltagError

    with pytest.raises(MltagError, match="revision 'nope' not found in data repo"):
        resolve_version("data", str(repo), "nope")
    # A folder read in place: its manifest changes when a file is added or rewritten.
    before = resolve_version(str(repo))
    (repo / "b.txt").write_text("new")
    assert resolve_version(str(repo)) != before
    # In the compiled pipeline resolve-data is never cached, and prepare takes its output as an input:
    # KFP caches prepare on the resolved version, so a moved branch or folder runs prepare again.
    _, (spec, _) = compiled
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["resolve-data"]["cachingOptions"].get("enableCache") is not True
    version_in = tasks["prepare"]["inputs"]["parameters"]["data_version"]["taskOutputParameter"]
    assert version_in["producerTask"] == "resolve-data"
    assert "data_rev" not in tasks["prepare"]["inputs"]["parameters"]


@pytest.mark.slow
def test_submit_to_an_unreachable_host_is_a_clear_error(tmp_path):
    from conftest import run_cli

    p = run_cli("pipeline", "run", "--host", "http://127.0.0.1:9", "--data", "gs://bucket/photos", "--arg",
                "bottleneck.cache_dir=gs://bucket/vectors", "--allow-dirty", cwd=tmp_path, check=False, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "cannot submit to http://127.0.0.1:9" in p.stderr
    p = run_cli("pipeline", "run", "--local", "--arg", "colour=red", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "'colour' is not SECTION.KEY" in p.stderr, p.stderr[-2000:]
    p = run_cli("pipeline", "run", "--local", "--arg", "train.epoch=3", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "unknown key train.epoch" in p.stderr, p.stderr[-2000:]









@pytest.mark.slow
def test_the_image_tag_follows_the_code_and_dirty_source_is_refused(tmp_path):
    """Compile from a git checkout of mltag's source: a committed change gives another image; an
    uncommitted one stops the compile unless --allow-dirty."""
    import shutil

    src = tmp_path / "checkout" / "src"
    shutil.copytree(REPO / "src" / "mltag", src / "mltag", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(src), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLTAG_IMAGE", None)
    repo = tmp_path / "checkout"

    def git(*args):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)

    def compile_image(*extra):
        code = ("import sys, mltag; assert mltag.__file__.startswith(sys.argv[1]), mltag.__file__;"
                "from mltag.cli import main; sys.exit(main(sys.argv[2:]))")
        p = subprocess.run([sys.executable, "-c", code, str(src), "pipeline", "compile", "--out",
                            str(tmp_path / "p.yaml"), *extra], cwd=tmp_path, env=env, capture_output=True, text=True)
        if p.returncode:
            return None, p.stderr
        spec, _ = yaml.safe_load_all((tmp_path / "p.yaml").read_text())
        return {ex["container"]["image"] for ex in spec["deploymentSpec"]["executors"].values()}, p.stderr

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "v1")
    first, _ = compile_image()
    assert first and len(first) == 1 and next(iter(first)).startswith("ghcr.io/mltag/mltag:")
    f = src / "mltag" / "metrics.py"
    f.write_text(f.read_text() + "\n# a change\n")
    dirty, err = compile_image()
    assert dirty is None and "uncommitted changes (src/mltag/metrics.py)" in err and "--allow-dirty" in err, err
    allowed, _ = compile_image("--allow-dirty")
    git("commit", "-qam", "v2")
    second, _ = compile_image()
    assert second == allowed and second != first  # the tag names the source, whatever git's version says




@pytest.mark.parametrize("arg, name", [("--data=data/demo", "prepare.input"),
                                       ("--arg=bottleneck.cache_dir=.mltag-cache/bottlenecks",
                                        "bottleneck.cache_dir")])
def test_a_relative_path_never_reaches_a_cluster(tmp_path, arg, name):
    """Refused before contacting the host (10.255.255.1 would not answer for a long time)."""
    import time

    from conftest import run_cli

    args = ["pipeline", "run", "--host", "http://10.255.255.1:8888", arg]
    if name != "prepare.input":
        args.append("--data=gs://bucket/photos")
    else:
        args.append("--arg=bottleneck.cache_dir=gs://bucket/vectors")
    t0 = time.time()
    p = run_cli(*args, cwd=tmp_path, check=False)
    assert time.time() - t0 < 30
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"mltag: error: {name} "), p.stderr


