"""The compiled Kubeflow pipeline: the committed YAML, GPU placement, resources, the DAG's shape, cluster checks."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from conftest import REPO
from mltag.config import sections
from mltag.kubeflow.run import compile_pipeline


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


def test_committed_yaml_equals_a_fresh_compile(compiled):
    text, _ = compiled
    committed = (REPO / "pipeline" / "pipeline.yaml").read_text()

    def same_image(t):  # the tag names the source digest: every commit has its own (tested below)
        return re.sub(r"(image: ghcr\.io/mltag/mltag):\S+", r"\1:TAG", t)

    assert same_image(committed) == same_image(text), \
        "pipeline/pipeline.yaml is stale: run `mltag pipeline compile` and commit it"


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
    assert params["backbone"]["defaultValue"]["handle"] == "builtin:efficientnet_lite2_ms+colour"


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


def test_fine_tuning_checkpoints_go_to_the_shared_store_on_a_cluster():
    """A relative train.checkpoint_dir (the default) would die with its pod: on a cluster it becomes checkpoints/ in
    the run's shared vector store; an absolute path or a URI is kept; without a shared store, none."""
    from mltag.kubeflow.entry import cluster_checkpoints

    default = ".mltag-cache/checkpoints"
    assert cluster_checkpoints(default, {"cache_dir": "gs://b/vectors/"}, "x") == "gs://b/vectors/checkpoints"
    assert cluster_checkpoints(default, {}, "/mnt/pvc/vectors") == "/mnt/pvc/vectors/checkpoints"
    assert cluster_checkpoints(default, {"cache_dir": ".mltag-cache/bottlenecks"}, "/mnt/x") == ""
    assert cluster_checkpoints("s3://b/ck", {"cache_dir": "gs://b/v"}, "x") == "s3://b/ck"
    assert cluster_checkpoints("/mnt/ck", {}, ".mltag-cache/bottlenecks") == "/mnt/ck"
    assert cluster_checkpoints("file:///mnt/ck", {}, ".mltag-cache/bottlenecks") == "file:///mnt/ck"  # shared as given
    assert cluster_checkpoints("", {"cache_dir": "gs://b/v"}, "x") == ""


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


def test_an_absolute_store_is_mounted_from_a_pvc_or_refused(tmp_path):
    from mltag.errors import MltagError

    spec, platform = _compile(tmp_path, bottleneck={"cache_dir": "/mnt/vectors"},
                              pipeline={"store_pvc": "vectors-rwx"})
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounted = {name for name, ex in executors.items()
               if any(m.get("mountPath") == "/mnt/vectors" and m.get("constant", m.get("pvcName")) == "vectors-rwx"
                      or m.get("mountPath") == "/mnt/vectors" for m in ex.get("pvcMount", []))}
    # train too: fine-tuning checkpoints each epoch into the store, so a retried pod resumes (#55)
    assert mounted == {"exec-bottleneck-shard", "exec-bottleneck", "exec-train"}, executors.keys()
    with pytest.raises(MltagError, match="set pipeline.store_pvc to a PersistentVolumeClaim"):
        _compile(tmp_path, bottleneck={"cache_dir": "/mnt/vectors"})
    with pytest.raises(MltagError, match="must then be an absolute path"):
        _compile(tmp_path, pipeline={"store_pvc": "vectors-rwx"})
    spec, platform = _compile(tmp_path, bottleneck={"cache_dir": "gs://bucket/vectors"})
    assert "pvcMount" not in json.dumps(platform)


def test_task_lines_time_side_by_side_iterations_of_one_task_each_from_its_own_start():
    """A ParallelFor's iterations share one task name and run in threads side by side: each row's seconds run from
    its own start (keyed by name, a later start overwrote an earlier one and the first to end got ~0 s)."""
    import io
    import threading
    import time

    from kfp.local import logging_utils

    from mltag.kubeflow.run import TaskLines

    lines = TaskLines(io.StringIO())
    name = logging_utils.format_task_name("bottleneck-shard")
    first_started, second_started = threading.Event(), threading.Event()

    def long():
        lines.write(f"Executing task {name}\n")
        first_started.set()
        second_started.wait(5)
        time.sleep(0.4)
        lines.write(f"Task {name} finished with status SUCCESS\n")

    def short():
        first_started.wait(5)
        time.sleep(0.3)
        lines.write(f"Executing task {name}\n")
        second_started.set()
        time.sleep(0.05)
        lines.write(f"Task {name} finished with status SUCCESS\n")

    threads = [threading.Thread(target=long), threading.Thread(target=short)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    seconds = sorted(r[2] for r in lines.rows)
    assert len(seconds) == 2 and seconds[0] < 0.3 and seconds[1] >= 0.65, seconds


def test_a_task_end_that_kfp_local_logs_after_another_task_put_back_the_root_logger_still_makes_its_row():
    """kfp.local's per-task logger context swaps the root logger's handlers and restores what it found: two tasks
    side by side, the first to leave restores the handlers from before the second began, and the second's
    "finished" line went nowhere (a row missing from `mltag pipeline run --local`)."""
    import io
    import logging
    import sys
    import threading

    from kfp.local import logging_utils

    from mltag.kubeflow.run import TaskLines, orphan_handler

    lines = TaskLines(io.StringIO())
    root, hit = logging.getLogger(), orphan_handler(lines)
    saved_handlers, saved_level, saved_stdout = root.handlers[:], root.level, sys.stdout
    root.handlers[:] = [hit]
    root.setLevel(logging.INFO)  # as run_local sets it for the run
    sys.stdout = lines
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    name = logging_utils.format_task_name("bottleneck-shard")

    def task_a():
        with logging_utils.local_logger_context():
            logging.info(f"Executing task {name}")
            a_in.set()
            b_in.wait(5)
            logging.info(f"Task {name} finished with status SUCCESS")
        a_out.set()

    def task_b():
        a_in.wait(5)
        with logging_utils.local_logger_context():
            logging.info(f"Executing task {name}")
            b_in.set()
            a_out.wait(5)  # A has put back the handlers from before B began
            logging.info(f"Task {name} finished with status SUCCESS")

    try:
        threads = [threading.Thread(target=task_a), threading.Thread(target=task_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    finally:
        sys.stdout = saved_stdout
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    assert [r[:2] for r in lines.rows] == [("bottleneck-shard", "SUCCESS")] * 2, lines.rows


def test_the_dockerfile_bakes_every_builtin_backbone_it_is_asked_for():
    """One list of names (a build argument, all built-ins and the default handle's by default); no size or handle
    copied from params.yaml."""
    from mltag.backbones.builtin import BUILTINS
    from mltag.config import Backbone

    text = (REPO / "Dockerfile").read_text()
    arg = next(ln for ln in text.splitlines() if ln.startswith("ARG BACKBONES="))
    assert arg.split("=", 1)[1].strip('"').split() == [*BUILTINS, Backbone().handle.removeprefix("builtin:")]
    body = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#") and not ln.startswith("ARG BACKBONES=")]
    assert not [ln for ln in body if "efficientnet" in ln or "260" in ln], body
    assert 'for name in $BACKBONES; do mltag backbone build "$name"; done' in text


def _all_tasks(dag: dict, comps: dict) -> dict[str, dict]:
    """Every container task of the DAG, those inside the ParallelFor's sub-DAG too (not the loop itself)."""
    out = {}
    for name, t in dag["tasks"].items():
        sub = comps.get(t["componentRef"]["name"], {}).get("dag")
        out.update(_all_tasks(sub, comps) if sub else {name: t})
    return out


def test_every_task_retries_with_exponential_backoff_and_0_turns_it_off(tmp_path, compiled):
    """#55: one preempted pod failed the whole run. Every task retries (pipeline.retries, 2 by default) after
    pipeline.retry_backoff seconds, doubling; 0 compiles no retry policy at all."""
    _, (spec, _) = compiled
    tasks = _all_tasks(spec["root"]["dag"], spec["components"])
    assert {"prepare", "bottleneck-shard", "train", "register", "review"} <= set(tasks), sorted(tasks)
    for name, t in tasks.items():
        assert t.get("retryPolicy") == {"maxRetryCount": 2, "backoffDuration": "30s", "backoffFactor": 2.0,
                                        "backoffMaxDuration": "3600s"}, (name, t)
    spec0, _ = _compile(tmp_path, pipeline={"retries": 0})
    assert not any("retryPolicy" in t for t in _all_tasks(spec0["root"]["dag"], spec0["components"]).values())
