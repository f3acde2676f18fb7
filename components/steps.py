"""Kubeflow lightweight components: one per step, each body only maps artifacts to mltag.

Bodies import mltag inside the function because KFP ships only the function's source
into the container; the project image (Dockerfile) has mltag installed.
"""

from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare(data: str, data_repo: str, data_rev: str, data_format: str, val_fraction: float, test_fraction: float,
            no_label: str, max_bad_fraction: float, salt: str, dataset: Output[Dataset], report: Output[HTML]):
    """Fetch the data (DVC repo + revision, or a path/URI) into the artifact, then prepare splits."""
    import shutil
    from pathlib import Path

    from mltag.fetch import fetch_dataset
    from mltag.prepare import prepare as run

    root = Path(dataset.path)
    source, version = fetch_dataset(data, data_repo, data_rev, root / "source")
    r = run(source, root / "prepared", data_format, val_fraction, test_fraction, no_label, max_bad_fraction,
            salt=salt, dataset_version=version, progress=False)
    shutil.copy(root / "prepared" / "report.html", report.path)
    dataset.metadata.update({"dataset_version": version or "", "source": data, "repo": data_repo,
                             "images": r["images_used"], "rejected": len(r["rejected"])})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def shard_indices(num_shards: int) -> List[int]:
    """The shard numbers a ParallelFor fans out over."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    return list(range(num_shards))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def bottleneck_shard(dataset: Input[Dataset], shard_index: int, num_shards: int, backbone_handle: str,
                     image_size: int, batch_size: int, engine: str, views: int, cache: Output[Dataset]):
    """Compute the feature vectors of one shard of the images into a cache artifact."""
    import os
    from pathlib import Path

    from mltag.bottleneck import bottleneck

    root = Path(dataset.path)
    s = bottleneck(root / "prepared", Path(cache.path) / "summary", backbone_handle, Path(cache.path) / "vectors",
                   os.environ.get("MLTAG_BACKBONE_CACHE", "/tmp/mltag-backbones"), image_size, batch_size, images=root / "source",
                   shard_index=shard_index, num_shards=num_shards, progress=False, engine=engine, views=views)
    cache.metadata.update({"computed": s["computed"], "shard": shard_index})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def bottleneck(dataset: Input[Dataset], shard_caches: Input[List[Dataset]], backbone_handle: str, image_size: int,
               batch_size: int, engine: str, views: int, bottlenecks: Output[Dataset]):
    """Gather the shards' vectors into the train/val/test feature files."""
    import os
    from pathlib import Path

    from mltag.bottleneck import bottleneck as run

    root = Path(dataset.path)
    s = run(root / "prepared", bottlenecks.path, backbone_handle, "/tmp/mltag-gather", os.environ.get("MLTAG_BACKBONE_CACHE", "/tmp/mltag-backbones"),
            image_size, batch_size, images=root / "source",
            extra_caches=[Path(c.path) / "vectors" for c in shard_caches], progress=False, engine=engine, views=views)
    bottlenecks.metadata.update({"backbone_id": s["backbone_id"], "computed_at_gather": s["computed"]})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(bottlenecks: Input[Dataset], dataset: Input[Dataset], mode: str, learning_rate: float, epochs: int,
          batch_size: int, hidden_units: int, dropout: float, patience: int, monitor: str, seed: int,
          fine_tune_blocks: int, fine_tune_epochs: int, fine_tune_learning_rate: float, fine_tune_patience: int,
          mixed_precision: str, experiment: str, tracking_uri: str, model: Output[Model],
          metrics: Output[Metrics]) -> NamedTuple("TrainOutputs", [("run_id", str)]):
    """Train the head on cached vectors, or (mode fine_tune, on the GPU pool) also the backbone's top blocks."""
    import os
    from collections import namedtuple
    from pathlib import Path

    from mltag.train import train as run

    config = {"train": {"mode": mode, "learning_rate": learning_rate, "epochs": epochs, "batch_size": batch_size,
                        "hidden_units": hidden_units, "dropout": dropout, "patience": patience,
                        "monitor": monitor, "seed": seed, "fine_tune_blocks": fine_tune_blocks,
                        "fine_tune_epochs": fine_tune_epochs, "fine_tune_learning_rate": fine_tune_learning_rate,
                        "fine_tune_patience": fine_tune_patience, "mixed_precision": mixed_precision}}
    s = run(bottlenecks.path, model.path, learning_rate, epochs, batch_size, hidden_units, dropout, patience,
            monitor, seed, os.environ.get("MLTAG_BACKBONE_CACHE", "/tmp/mltag-backbones"), tracking_uri or None,
            experiment, config=config, progress=False, mode=mode, images=Path(dataset.path) / "source",
            fine_tune_blocks=fine_tune_blocks, fine_tune_epochs=fine_tune_epochs,
            fine_tune_learning_rate=fine_tune_learning_rate, fine_tune_patience=fine_tune_patience,
            mixed_precision=mixed_precision)
    for k in ("val_loss", "train_loss", "best_epoch", "fine_tune_val_loss", "fine_tune_best_epoch"):
        if s.get(k) is not None:
            metrics.log_metric(k, s[k])
    model.metadata.update({"run_id": s["run_id"], "framework": "tensorflow", "mode": mode})
    return namedtuple("TrainOutputs", ["run_id"])(s["run_id"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(model: Input[Model], bottlenecks: Input[Dataset], dataset: Input[Dataset], run_id: str,
             bootstrap: int, seed: int, tracking_uri: str, evaluation: Output[Dataset], metrics: Output[Metrics],
             report: Output[HTML]):
    """Test metrics with intervals and baselines, logged to the train run; an error-analysis page."""
    import shutil
    from pathlib import Path

    from mltag.evaluate import evaluate as run

    r = run(model.path, bottlenecks.path, evaluation.path, Path(evaluation.path) / "metrics.json",
            Path(dataset.path) / "source", bootstrap, seed, tracking_uri or None, run_id=run_id)
    for k in ("map", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "roc_auc_macro"):
        if r.get(k) is not None:
            metrics.log_metric(k, r[k])
    shutil.copy(Path(evaluation.path) / "report.html", report.path)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def calibrate(evaluation: Input[Dataset], model: Input[Model], bottlenecks: Input[Dataset], run_id: str, method: str,
              min_precision: float, min_positives: int, cv_folds: int, shrink: float, min_gain: float,
              tracking_uri: str, thresholds: Output[Dataset], metrics: Output[Metrics]):
    """Per-label thresholds from out-of-fold scores over train+val (min_precision < 0 means unset)."""
    from pathlib import Path

    from mltag.calibrate import calibrate as run

    out = Path(thresholds.path)
    r = run(evaluation.path, model.path, out / "thresholds.json", out / "metrics.json", method,
            None if min_precision < 0 else min_precision, min_positives, tracking_uri or None, run_id=run_id,
            bottlenecks=bottlenecks.path, cv_folds=cv_folds, shrink=shrink, min_gain=min_gain, progress=False)
    for k, v in r["test_at_thresholds"].items():
        if isinstance(v, float):
            metrics.log_metric(f"calibrated_{k}", v)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(model: Input[Model], thresholds: Input[Dataset], dataset: Input[Dataset], run_id: str,
             model_name: str, experiment: str, margin: float, max_label_ap_drop: float, tflite: bool,
             tracking_uri: str, decision: Output[Metrics]) -> str:
    """Register the version, alias challenger, and promote to champion through the gate."""
    from pathlib import Path

    from mltag.register import register as run

    root = Path(dataset.path)
    r = run(model.path, Path(thresholds.path) / "thresholds.json", root / "prepared", decision.path, model_name,
            margin, max_label_ap_drop, images=root / "source", tracking_uri=tracking_uri or None,
            experiment=experiment, run_id=run_id, tflite=tflite)
    decision.log_metric("version", r["version"])
    decision.log_metric("promoted", 1.0 if r["promoted"] else 0.0)
    decision.log_metric("challenger_test_map", r["challenger_test_map"])
    decision.metadata["reason"] = r["reason"]
    return f"{model_name}/{r['version']}:{'champion' if r['promoted'] else 'challenger'}"
