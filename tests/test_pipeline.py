"""The Kubeflow pipeline: compiled YAML checked, and the whole DAG run with kfp.local."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from mltag.config import sections
from mltag.kubeflow.run import compile_pipeline


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[str, list]:
    out = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    env_image = os.environ.pop("MLTAG_IMAGE", None)
    try:
        from mltag.config import load_params

        compile_pipeline(out, load_params(REPO / "params.yaml"), allow_dirty=True)
    finally:
        if env_image is not None:
            os.environ["MLTAG_IMAGE"] = env_image
    text = out.read_text()
    return text, list(yaml.safe_load_all(text))


def test_committed_yaml_equals_a_fresh_compile(compiled):
    text, _ = compiled
    committed = (REPO / "pipeline" / "pipeline.yaml").read_text()

    def same_image(t):  # the tag names the source digest: every commit has its own (tested below)
        return re.sub(r"(image: ghcr\.io/mltag/mltag):\S+", r"\1:TAG", t)

    assert same_image(committed) == same_image(text), \
        "pipeline/pipeline.yaml is stale: run `mltag pipeline compile` and commit it"


def _compile(tmp_path, **sections) -> tuple[dict, dict]:
    from mltag.config import load_params

    params = load_params(REPO / "params.yaml")
    for section, values in sections.items():
        params = params.replace(section, **values)
    out = compile_pipeline(tmp_path / "p.yaml", params, allow_dirty=True)
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform


def _gpu_executors(spec: dict, platform: dict) -> dict[str, dict]:
    """executor name -> its kubernetes platform config, for executors that ask for a GPU."""
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    out = {}
    for name, ex in spec["deploymentSpec"]["executors"].items():
        acc = ex["container"].get("resources", {}).get("accelerator")
        if acc:
            assert (acc["resourceType"], acc["resourceCount"]) == ("nvidia.com/gpu", "1"), name
            out[name] = dict(k8s[name], env=ex["container"].get("env", []), image=ex["container"]["image"])
    return out


def test_head_mode_puts_nothing_on_the_gpu(compiled):
    """The default (train.mode head) fits a dense layer on cached vectors: no task asks for a GPU."""
    _, (spec, platform) = compiled
    assert _gpu_executors(spec, platform) == {}
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert k8s["secretAsEnv"][0]["secretName"] == "mlflow-tracking" and k8s["secretAsEnv"][0]["optional"]
    assert "nodeSelector" not in k8s


def test_fine_tune_puts_train_on_the_gpu_pool_and_fails_fast_without_one(tmp_path):
    spec, platform = _compile(tmp_path, train={"mode": "fine_tune"}, pipeline={"gpu_image": "reg/mltag:1-gpu"})
    gpu = _gpu_executors(spec, platform)
    assert set(gpu) == {"exec-train"}
    train = gpu["exec-train"]
    assert train["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in train["tolerations"]
    assert train["image"] == "reg/mltag:1-gpu"
    assert {"name": "MLTAG_REQUIRE_GPU", "value": "1"} in train["env"]
    assert spec["root"]["dag"]["tasks"]["train"]["inputs"]["parameters"]["defaults"]["runtimeValue"]["constant"][
        "train"]["mode"] == "fine_tune"


def test_bottleneck_shards_on_the_gpu_pool_when_asked(tmp_path):
    from mltag.errors import MltagError

    spec, platform = _compile(tmp_path, bottleneck={"engine": "tf"},
                              pipeline={"bottleneck_on_gpu": True, "allow_cpu": True})
    gpu = _gpu_executors(spec, platform)
    assert set(gpu) == {"exec-bottleneck-shard"}  # head mode: train stays on CPU
    assert {"name": "MLTAG_REQUIRE_GPU", "value": "0"} in gpu["exec-bottleneck-shard"]["env"]
    with pytest.raises(MltagError, match="bottleneck_on_gpu needs bottleneck.engine tf"):
        _compile(tmp_path, bottleneck={"engine": "litert"}, pipeline={"bottleneck_on_gpu": True})


def test_a_gpu_step_without_a_gpu_fails_at_once(tmp_path, monkeypatch):
    """MLTAG_REQUIRE_GPU=1 (set on GPU tasks) on a machine with no GPU: a clear error before any work."""
    from mltag.errors import MltagError
    from mltag.steps.train import train

    monkeypatch.setenv("MLTAG_REQUIRE_GPU", "1")
    with pytest.raises(MltagError, match="placed on the GPU pool but has no GPU.*allow_cpu"):
        train(tmp_path / "missing-bottlenecks", tmp_path / "model", **sections("train"))
    monkeypatch.setenv("MLTAG_REQUIRE_GPU", "0")
    with pytest.raises(MltagError, match="run the bottleneck step first"):  # allowed on CPU: past the check
        train(tmp_path / "missing-bottlenecks", tmp_path / "model", **sections("train"))


def test_every_step_requests_cpu_and_memory_and_runs_the_project_image(compiled):
    _, (spec, _) = compiled
    from mltag import __version__
    from mltag.kubeflow.image import default_image

    for name, ex in spec["deploymentSpec"]["executors"].items():
        c = ex["container"]
        assert c["resources"].get("resourceCpuRequest") and c["resources"].get("resourceMemoryRequest"), name
        assert c["image"] == default_image() and __version__.replace("+", "-") in c["image"], name
        assert "pip install" not in " ".join(c.get("command", [])), f"{name} must not install kfp at runtime"


def test_dag_shape_parallelfor_and_no_cache_on_register(compiled):
    _, (spec, _) = compiled
    tasks = spec["root"]["dag"]["tasks"]
    loops = [t for t in tasks.values() if "parameterIterator" in t]
    assert len(loops) == 1 and loops[0]["iteratorPolicy"]["parallelismLimit"] == 4
    assert set(tasks["train"]["dependentTasks"]) == {"bottleneck", "prepare"}  # fine_tune reads images
    assert "train" in tasks["register"]["dependentTasks"] and "calibrate" in tasks["register"]["dependentTasks"]
    assert tasks["register"].get("cachingOptions", {}).get("enableCache") is not True
    assert tasks["train"]["cachingOptions"]["enableCache"] is True
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["train"]["defaultValue"]["learning_rate"] == 0.001  # from params.yaml
    assert params["backbone"]["defaultValue"]["handle"] == "builtin:efficientnet_lite2"


def test_without_collected_the_gather_waits_for_the_loop_and_needs_a_shared_store(tmp_path):
    from mltag.errors import MltagError

    with pytest.raises(MltagError, match="collect_shards false needs a vector store every pod sees"):
        _compile(tmp_path, pipeline={"collect_shards": False})  # the default store is a relative folder
    spec, _ = _compile(tmp_path, pipeline={"collect_shards": False}, bottleneck={"cache_dir": "gs://bucket/vectors"})
    gather = spec["root"]["dag"]["tasks"]["bottleneck-from-store"]
    assert "for-loop-1" in gather["dependentTasks"]
    assert "shard_caches" not in json.dumps(gather)
    collected = _compile(tmp_path, bottleneck={"cache_dir": "gs://bucket/vectors"})[0]["root"]["dag"]["tasks"]
    assert "shard_caches" in json.dumps(collected["bottleneck"])


def _stats(root: Path) -> tuple[list[dict], dict]:
    """The shards' and the gather's run statistics from one kfp.local run's artifacts."""
    import json

    found = {f: json.loads(f.read_text()) for f in root.rglob("stats.json")}
    shards = [v for f, v in found.items() if "bottleneck-shard" in str(f)]
    (gather,) = [v for f, v in found.items() if "bottleneck-shard" not in str(f)]
    return shards, gather


@pytest.mark.slow
def test_full_pipeline_runs_locally_twice_and_computes_only_new_images(tmp_path, fake_backbone, mlflow_store):
    """Two kfp.local runs sharing a vector store folder: the second, with 10% more images, computes
    only those, in its shards; the gather computes nothing. The images are read in place. The second
    run uses the fan-in for older backends (pipeline.collect_shards false)."""
    import json

    from mlflow import MlflowClient

    from conftest import make_colour_dataset, write_lst_dataset
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
    run_local(data=str(data), pipeline_root=str(tmp_path / "run1"), params=load_params(REPO / "params.yaml"),
              overrides=overrides)
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

    rows += make_colour_dataset(data, n=4, seed=7, start=40)
    write_lst_dataset(data, rows)
    # The second run as compiled for a backend without dsl.Collected: the gather reads the store only.
    older_backend = load_params(REPO / "params.yaml").replace("pipeline", collect_shards=False)
    run_local(data=str(data), pipeline_root=str(tmp_path / "run2"), params=older_backend, overrides=overrides)
    shards, gather = _stats(tmp_path / "run2")
    assert sum(s["computed"] for s in shards) == 4 and sum(s["cached"] for s in shards) == 40
    assert gather["computed"] == 0 and gather["cached"] == 44
    assert len(client.search_model_versions("name='kfp-model'")) == 2


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


@pytest.mark.slow
def test_pipeline_reads_a_dvc_dataset_by_reference(tmp_path, colour_dataset, fake_backbone, mlflow_store, monkeypatch):
    """data_repo + data_rev on kfp.local: prepare resolves the branch to its commit, no artifact holds an
    image, and every later step reads the images it needs from the repo at that commit."""
    import json

    from mlflow import MlflowClient

    from mltag.config import load_params
    from mltag.kubeflow.run import run_local

    repo, v1 = make_dvc_data_repo(tmp_path, colour_dataset)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "pods"))  # the steps' scratch space
    (tmp_path / "pods").mkdir()
    run_local(data="colours", data_repo=str(repo), data_rev=v1, pipeline_root=str(tmp_path / "run"),
              params=load_params(REPO / "params.yaml"),
              overrides={"backbone.handle": str(fake_backbone), "bottleneck.num_shards": "2",
                         "bottleneck.cache_dir": str(tmp_path / "store"), "bottleneck.views": "1",
                         "train.learning_rate": "0.05", "evaluate.bootstrap": "20", "train.patience": "30",
                         "register.model_name": "by-ref"})
    mv = MlflowClient().get_model_version_by_alias("by-ref", "champion")
    assert MlflowClient().get_run(mv.run_id).data.metrics["test_map"] >= 0.9
    (ref,) = [json.loads(f.read_text()) for f in (tmp_path / "run").rglob("images.json")]
    assert ref == {"format": 1, "root": "colours", "repo": str(repo), "rev": v1}
    assert not [p for p in (tmp_path / "run").rglob("*.jpg")], "an artifact holds images"
    (prepared_labels,) = (tmp_path / "run").rglob("prepared/labels.txt")
    assert prepared_labels.read_text().split() == ["red", "green", "blue"]  # v1, not the branch head


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


def test_on_a_cluster_without_a_tracking_uri_the_first_step_stops_with_how_to(monkeypatch):
    from mltag.errors import MltagError
    from mltag.kubeflow.components import resolve_data

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # what every Kubernetes pod has
    body = resolve_data.python_func
    with pytest.raises(MltagError, match="no MLflow tracking URI on a Kubernetes cluster.*--tracking-uri.*"
                                         "kubectl create secret generic mlflow-tracking"):
        body(prepare={}, defaults={"prepare": {"input": "/nowhere"}}, data_repo="", data_rev="", tracking_uri="")
    # With the parameter (or the secret's variable) it goes on, to the next error: the data is missing.
    with pytest.raises(MltagError, match="dataset not found"):
        body(prepare={}, defaults={"prepare": {"input": "/nowhere"}}, data_repo="", data_rev="",
             tracking_uri="http://mlflow:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    with pytest.raises(MltagError, match="dataset not found"):
        body(prepare={}, defaults={"prepare": {"input": "/nowhere"}}, data_repo="", data_rev="", tracking_uri="")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # off the cluster (kfp.local, dvc): the local default is fine
    with pytest.raises(MltagError, match="dataset not found"):
        body(prepare={}, defaults={"prepare": {"input": "/nowhere"}}, data_repo="", data_rev="", tracking_uri="")


def test_which_vector_stores_count_as_shared_on_a_cluster():
    from mltag.config import load_params
    from mltag.kubeflow.entry import shared_store

    p = load_params(REPO / "params.yaml")
    shared = {v: shared_store(p.replace("bottleneck", cache_dir=v))
              for v in (".mltag-cache/bottlenecks", "/mnt/pvc/vectors", "file:///mnt/pvc/vectors", "gs://b/v")}
    assert shared == {".mltag-cache/bottlenecks": None, "/mnt/pvc/vectors": "/mnt/pvc/vectors",
                      "file:///mnt/pvc/vectors": "file:///mnt/pvc/vectors", "gs://b/v": "gs://b/v"}


def test_a_bucket_dataset_resolves_to_a_manifest_and_is_read_by_reference(tmp_path, colour_dataset):
    """fsspec's local:// protocol stands in for s3:// and gs:// (the same code path: listing, get_file)."""
    from mltag.data.fetch import ImageSource, fetch_dataset, resolve_version
    from mltag.errors import MltagError

    uri = f"local://{colour_dataset}"
    v1 = resolve_version(uri)
    assert v1.startswith(f"{uri}#manifest-") and resolve_version(uri) == v1
    got = fetch_dataset(uri, dest=tmp_path / "scratch-prepare")
    assert len(list((got / "images").iterdir())) == 48
    src = ImageSource(uri, rev=v1, scratch=tmp_path / "scratch")
    root = src.localize(["images/0001.jpg"])
    assert [p.name for p in root.rglob("*.jpg")] == ["0001.jpg"]
    (colour_dataset / "images" / "0001.jpg").write_bytes(b"changed")
    v2 = resolve_version(uri)
    assert v2 != v1  # a changed object: a new version, so prepare runs again and the scratch key changes
    assert ImageSource(uri, rev=v2).scratch != ImageSource(uri, rev=v1).scratch
    with pytest.raises(MltagError, match="is a local path: read it in place"):
        fetch_dataset(str(colour_dataset), dest=tmp_path / "never")


@pytest.mark.slow
def test_a_local_run_prints_a_line_per_task_and_a_second_cached_run_says_so(tmp_path, fake_backbone):
    """`mltag pipeline run --local` prints about 20 lines, not kfp.local's hundreds; with --cache a rerun
    reuses the cached tasks (the dataset version and register always run)."""
    from conftest import make_colour_dataset, run_cli, write_lst_dataset

    data = tmp_path / "colours"
    write_lst_dataset(data, make_colour_dataset(data, n=40))
    args = ["pipeline", "run", "--local", "--cache", "--data", str(data), "--pipeline-root", str(tmp_path / "run"),
            "--params", str(REPO / "params.yaml")]
    for kv in (f"backbone.handle={fake_backbone}", f"bottleneck.cache_dir={tmp_path / 'store'}", "bottleneck.views=1",
               "train.learning_rate=0.05", "evaluate.bootstrap=20", "register.model_name=quiet"):
        args += ["--arg", kv]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    first = run_cli(*args, cwd=tmp_path, env=env)
    lines = (first.stdout + first.stderr).splitlines()
    assert len(lines) <= 20, "\n".join(lines)
    assert "Executor input" not in first.stdout and "Warning" not in first.stderr, first.stderr
    tasks = [ln.split() for ln in first.stdout.splitlines() if ln.startswith("  ")]
    names = [t[0] for t in tasks]
    assert {"prepare", "train", "evaluate", "calibrate", "register"} <= set(names), first.stdout
    assert all(t[1] == "SUCCESS" and t[-1] == "computed" for t in tasks), first.stdout
    assert f"{len(tasks)} tasks succeeded ({len(tasks)} computed, 0 cached)" in first.stdout
    second = run_cli(*args, cwd=tmp_path, env=env)
    again = {t[0]: t[-1] for t in (ln.split() for ln in second.stdout.splitlines() if ln.startswith("  "))}
    assert again["prepare"] == again["bottleneck-shard"] == again["bottleneck"] == "cached", second.stdout
    assert again["resolve-data"] == again["register"] == "computed", second.stdout  # never cached


def test_task_lines_keep_each_task_apart_and_show_a_failed_tasks_log():
    """TaskLines reads kfp.local's own banners (made by its logging_utils), per thread."""
    import io
    import threading

    from kfp.local import logging_utils, status

    from mltag.kubeflow.run import TaskLines

    out = io.StringIO()
    lines = TaskLines(out)

    def task(name, ok):
        lines.write(f"12:00:00.000 - INFO - Executing task {logging_utils.format_task_name(name)}\n")
        for i in range(50):
            lines.write(f"    {name} log line {i}\n")
        st = status.Status.SUCCESS if ok else status.Status.FAILURE
        lines.write(f"12:00:01.000 - INFO - Task {logging_utils.format_task_name(name)} finished with status "
                    f"{logging_utils.format_status(st)}\n")

    threads = [threading.Thread(target=task, args=(f"shard-{i}", i != 1)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shown = out.getvalue().splitlines()
    assert sorted(ln.split()[0] for ln in shown) == ["shard-0", "shard-1", "shard-2"]
    assert {ln.split()[0]: ln.split()[1] for ln in shown}["shard-1"] == "FAILURE"
    log = lines.failed_log(tail=5).splitlines()
    assert log[0].startswith("--- shard-1") and log[1:] == [f"    shard-1 log line {i}" for i in range(45, 50)]
    verbose = io.StringIO()
    TaskLines(verbose, verbose=True).write("anything at all\n")
    assert verbose.getvalue() == "anything at all\n"


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


def test_an_absolute_store_is_mounted_from_a_pvc_or_refused(tmp_path):
    from mltag.errors import MltagError

    spec, platform = _compile(tmp_path, bottleneck={"cache_dir": "/mnt/vectors"},
                              pipeline={"store_pvc": "vectors-rwx"})
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounted = {name for name, ex in executors.items()
               if any(m.get("mountPath") == "/mnt/vectors" and m.get("constant", m.get("pvcName")) == "vectors-rwx"
                      or m.get("mountPath") == "/mnt/vectors" for m in ex.get("pvcMount", []))}
    assert mounted == {"exec-bottleneck-shard", "exec-bottleneck"}, executors.keys()
    with pytest.raises(MltagError, match="set pipeline.store_pvc to a PersistentVolumeClaim"):
        _compile(tmp_path, bottleneck={"cache_dir": "/mnt/vectors"})
    with pytest.raises(MltagError, match="must then be an absolute path"):
        _compile(tmp_path, pipeline={"store_pvc": "vectors-rwx"})
    spec, platform = _compile(tmp_path, bottleneck={"cache_dir": "gs://bucket/vectors"})
    assert "pvcMount" not in json.dumps(platform)


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


def test_the_dockerfile_bakes_every_builtin_backbone_it_is_asked_for():
    """One list of names (a build argument, all built-ins by default); no size or handle copied from params.yaml."""
    from mltag.backbones.builtin import BUILTINS

    text = (REPO / "Dockerfile").read_text()
    arg = next(ln for ln in text.splitlines() if ln.startswith("ARG BACKBONES="))
    assert arg.split("=", 1)[1].strip('"').split() == list(BUILTINS)
    body = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#") and not ln.startswith("ARG BACKBONES=")]
    assert not [ln for ln in body if "efficientnet" in ln or "260" in ln], body
    assert 'for name in $BACKBONES; do mltag backbone build "$name"; done' in text
