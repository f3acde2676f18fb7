"""Kubeflow lightweight components: one per step, each body maps artifacts to ``mltag.steps.run_step``.

Every component takes the params.yaml sections its step reads as dicts (the same names
as params.yaml, ``tests/unit/test_config.py`` checks them) plus ``defaults``, the compiled
values of those sections. Bodies import mltag inside the function because KFP ships only
the function's source into the container; the project image (Dockerfile) has mltag.
"""

from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from mltag.kubeflow.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve_data(prepare: dict, defaults: dict, data_repo: str, data_rev: str, tracking_uri: str) -> str:
    """The dataset's immutable version now (repo@commit, or a manifest hash): never cached, so prepare,
    cached on this value, runs again exactly when the branch, bucket or folder has moved."""
    from mltag.data.fetch import resolve_version
    from mltag.kubeflow.entry import check_cluster_tracking, params_for

    check_cluster_tracking(tracking_uri)  # the first step: a missing tracking URI stops the run here
    params = params_for("prepare", {"prepare": prepare}, defaults)
    return resolve_version(params.prepare.input, data_repo, data_rev)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare(prepare: dict, defaults: dict, data_repo: str, data_version: str, dataset: Output[Dataset],
            report: Output[HTML]):
    """Prepare splits and content hashes. The artifact holds no images, only where they are: a
    folder every pod sees is read in place; a bucket or a DVC repo (at the resolved commit) is
    read once here from pod-local scratch, and later steps download just what they need."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from mltag.data.fetch import fetch_dataset, is_remote
    from mltag.data.formats import image_root_of, write_images_ref
    from mltag.kubeflow.entry import params_for
    from mltag.steps import run_step

    params = params_for("prepare", {"prepare": prepare}, defaults)
    root = Path(dataset.path)
    root.mkdir(parents=True, exist_ok=True)
    data = params.prepare.input
    remote = bool(data_repo) or is_remote(data)
    scratch = Path(tempfile.mkdtemp(prefix="mltag-prepare-")) if remote else None
    try:
        if remote:
            rev = data_version.rpartition("@")[2] if data_repo else data_version  # a commit, or a manifest
            local = fetch_dataset(data, data_repo, rev, scratch / "data")
            params = params.replace("prepare", input=str(local))
        r = run_step("prepare", params, out=root / "prepared", dataset_version=data_version, progress=False)
        images = image_root_of(root / "prepared")
        if remote:
            rel = os.path.relpath(images, scratch / "data").replace(os.sep, "/")
            base = data.rstrip("/")
            write_images_ref(root, base if rel == "." else f"{base}/{rel}", data_repo, rev)
        else:
            write_images_ref(root, str(images))
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    shutil.copy(root / "prepared" / "report.html", report.path)
    dataset.metadata.update({"dataset_version": data_version, "source": data, "repo": data_repo,
                             "images": r["images_used"], "rejected": len(r["rejected"])})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def shard_indices(bottleneck: dict, defaults: dict) -> List[int]:
    """The shard numbers a ParallelFor fans out over (bottleneck.num_shards)."""
    from mltag.kubeflow.entry import params_for

    n = params_for("bottleneck", {"bottleneck": bottleneck}, defaults).bottleneck.num_shards
    if n < 1:
        raise ValueError(f"bottleneck.num_shards must be at least 1, got {n}")
    return list(range(n))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def bottleneck_shard(dataset: Input[Dataset], shard_index: int, bottleneck: dict, backbone: dict, defaults: dict,
                     cache: Output[Dataset]):
    """Compute the vectors of one shard (by cache key: stable when images are added) that the store lacks.

    With a shared store (``bottleneck.cache_dir`` an fsspec URI or a mounted absolute path)
    they go there and later runs reuse them; otherwise into this task's artifact.
    """
    from pathlib import Path

    from mltag.kubeflow.entry import images_of, params_for, shared_store
    from mltag.steps import run_step

    params = params_for("bottleneck", {"bottleneck": bottleneck, "backbone": backbone}, defaults)
    store = shared_store(params)
    if store is None:  # no store every pod sees: this shard's vectors travel as its artifact
        params = params.replace("bottleneck", cache_dir=str(Path(cache.path) / "vectors"))
    root = Path(dataset.path)
    out = Path(cache.path)
    s = run_step("bottleneck", params, prepared=root / "prepared", out=out / "summary", images=images_of(root),
                 shard_index=shard_index, progress=False, metrics=out / "stats.json")
    cache.metadata.update({"computed": s["computed"], "cached": s["cached"], "shard": shard_index,
                           "store": store or ""})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def bottleneck(dataset: Input[Dataset], shard_caches: Input[List[Dataset]], bottleneck: dict, backbone: dict,
               defaults: dict, bottlenecks: Output[Dataset]):
    """Gather the vectors into the train/val/test feature files: from the shared store, or from the
    shards' artifacts without one. Computes nothing when every shard succeeded."""
    from mltag.kubeflow.entry import gather_vectors, params_for

    params = params_for("bottleneck", {"bottleneck": bottleneck, "backbone": backbone}, defaults)
    bottlenecks.metadata.update(gather_vectors(dataset.path, bottlenecks.path, params, [c.path for c in shard_caches]))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def bottleneck_from_store(dataset: Input[Dataset], bottleneck: dict, backbone: dict, defaults: dict,
                          bottlenecks: Output[Dataset]):
    """The gather for KFP backends without dsl.Collected of artifacts (pipeline.collect_shards false):
    it runs after the whole shard loop and reads the shared vector store only."""
    from mltag.kubeflow.entry import gather_vectors, params_for, require_shared_store

    params = params_for("bottleneck", {"bottleneck": bottleneck, "backbone": backbone}, defaults)
    require_shared_store(params)
    bottlenecks.metadata.update(gather_vectors(dataset.path, bottlenecks.path, params, []))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(bottlenecks: Input[Dataset], dataset: Input[Dataset], train: dict, backbone: dict, tracking: dict,
          defaults: dict, tracking_uri: str, store: dict, store_default: str, model: Output[Model],
          metrics: Output[Metrics]) -> NamedTuple("TrainOutputs", [("run_id", str)]):
    """Train the head on cached vectors, or (mode fine_tune, on the GPU pool) also the backbone's top blocks,
    checkpointed each epoch into the shared vector store (``store``: the run's bottleneck section) so that a
    retried pod resumes."""
    from collections import namedtuple

    from mltag.kubeflow.entry import (
        check_cluster_tracking,
        check_fixed_mode,
        cluster_checkpoints,
        images_for,
        params_for,
    )
    from mltag.steps import run_step

    check_cluster_tracking(tracking_uri)
    params = params_for("train", {"train": train, "backbone": backbone, "tracking": tracking}, defaults)
    check_fixed_mode(params, defaults)
    if params.train.mode == "fine_tune":
        params = params.replace("train", checkpoint_dir=cluster_checkpoints(params.train.checkpoint_dir, store,
                                                                            store_default))
    images = images_for(dataset.path, {"train": None, "val": None}) if params.train.mode == "fine_tune" else None
    from pathlib import Path

    from mltag.data.formats import dataset_source, dataset_version, label_groups_of

    source = dataset_source(dataset.path) if (Path(dataset.path) / "dataset.json").is_file() else None
    s = run_step("train", params, bottlenecks=bottlenecks.path, out=model.path, tracking_uri=tracking_uri or None,
                 progress=False, images=images, dataset=source, dataset_version=dataset_version(dataset.path),
                 exclusive_groups=label_groups_of(dataset.path))
    for k in ("val_loss", "train_loss", "best_epoch", "fine_tune_val_loss", "fine_tune_best_epoch"):
        if s.get(k) is not None:
            metrics.log_metric(k, s[k])
    model.metadata.update({"run_id": s["run_id"], "framework": "tensorflow", "mode": params.train.mode})
    return namedtuple("TrainOutputs", ["run_id"])(s["run_id"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(model: Input[Model], bottlenecks: Input[Dataset], dataset: Input[Dataset],
             evaluate: dict, defaults: dict, evaluation: Output[Dataset],
             metrics: Output[Metrics], report: Output[HTML]):
    """Test metrics with intervals and baselines (register logs them into the train run); an error-analysis
    page."""
    import shutil
    from pathlib import Path

    from mltag.data.formats import model_mode
    from mltag.kubeflow.entry import images_for, params_for
    from mltag.steps import run_step

    params = params_for("evaluate", {"evaluate": evaluate}, defaults)
    # end-to-end scoring (fine-tuned model, TTA) reads val and test; the report's thumbnails read test
    end_to_end = model_mode(model.path) == "fine_tune" or params.evaluate.tta != "none"
    images = images_for(dataset.path, {"val": None, "test": None} if end_to_end else {"test": None})
    r = run_step("evaluate", params, model_dir=model.path, bottlenecks=bottlenecks.path, out=evaluation.path,
                 metrics_file=Path(evaluation.path) / "metrics.json", images=images)
    for k in ("map", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "roc_auc_macro"):
        if r.get(k) is not None:
            metrics.log_metric(k, r[k])
    shutil.copy(Path(evaluation.path) / "report.html", report.path)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def calibrate(evaluation: Input[Dataset], model: Input[Model], bottlenecks: Input[Dataset],
              calibrate: dict, defaults: dict, thresholds: Output[Dataset], metrics: Output[Metrics]):
    """Per-label thresholds from out-of-fold scores over train+val."""
    from pathlib import Path

    from mltag.kubeflow.entry import params_for
    from mltag.steps import run_step

    params = params_for("calibrate", {"calibrate": calibrate}, defaults)
    out = Path(thresholds.path)
    r = run_step("calibrate", params, evaluation=evaluation.path, model_dir=model.path, out=out / "thresholds.json",
                 metrics_file=out / "metrics.json", bottlenecks=bottlenecks.path, progress=False, oof_out=out / "oof_scores.npz",
                 report=out / "details.json")
    for k, v in r["test_at_thresholds"].items():
        if isinstance(v, float):
            metrics.log_metric(f"calibrated_{k}", v)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def review(thresholds: Input[Dataset], model: Input[Model], dataset: Input[Dataset], review: dict,
           defaults: dict, issues: Output[Dataset], metrics: Output[Metrics], report: Output[HTML]):
    """Likely label errors from calibrate's out-of-fold scores (CPU; never gates register)."""
    import shutil
    from pathlib import Path

    from mltag.kubeflow.entry import images_of, params_for
    from mltag.steps import run_step

    params = params_for("review", {"review": review}, defaults)
    root = images_of(dataset.path)  # thumbnails from a local or mounted image root; a bucket's are not fetched
    r = run_step("review", params, oof=Path(thresholds.path) / "oof_scores.npz", out=issues.path,
                 metrics_file=Path(issues.path) / "metrics.json",
                 images=root if isinstance(root, Path) else None, model_dir=model.path, progress=False)
    metrics.log_metric("issues", float(r["issues"]))
    metrics.log_metric("issue_rate", r["issue_rate"])
    for name, x in r["per_label"].items():
        metrics.log_metric(f"noise_rate_{name}", x["noise_rate"])
    shutil.copy(Path(issues.path) / "review.html", report.path)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(model: Input[Model], thresholds: Input[Dataset], dataset: Input[Dataset], bottlenecks: Input[Dataset],
             evaluation: Input[Dataset], issues: Input[Dataset], run_id: str, register: dict, tracking: dict,
             defaults: dict, tracking_uri: str, decision: Output[Metrics]) -> str:
    """Log evaluate's, calibrate's and review's figures into the train run; register the version, alias
    challenger, and promote to champion through the gate."""
    from pathlib import Path

    from mltag.kubeflow.entry import check_cluster_tracking, images_for, params_for
    from mltag.steps import run_step

    check_cluster_tracking(tracking_uri)
    params = params_for("register", {"register": register, "tracking": tracking}, defaults)
    root = Path(dataset.path)
    r = run_step("register", params, model_dir=model.path, thresholds=Path(thresholds.path) / "thresholds.json",
                 prepared=root / "prepared", out=decision.path, bottlenecks=bottlenecks.path,
                 images=images_for(root, {"test": None, "train": 100}),  # the gate's test set, int8 calibration
                 tracking_uri=tracking_uri or None, run_id=run_id,
                 reports=[Path(evaluation.path) / "details.json", Path(thresholds.path) / "details.json",
                          Path(issues.path) / "details.json"])
    decision.log_metric("version", r["version"])
    decision.log_metric("promoted", 1.0 if r["promoted"] else 0.0)
    decision.log_metric("challenger_test_map", r["challenger_test_map"])
    decision.metadata["reason"] = r["reason"]
    return f"{params.register.model_name}/{r['version']}:{'champion' if r['promoted'] else 'challenger'}"
