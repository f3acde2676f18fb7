"""Batch prediction and drift checks as Kubeflow pipelines of their own. Batch prediction: a list of images split into shards, each shard
predicted by its own task (a ParallelFor), the shards' rows gathered into one predictions file.

The image list travels as a file artifact (never as a parameter or an argument: it grows with the data);
each shard takes a contiguous slice, so the gathered file keeps the list's order. (No ``from __future__
import annotations`` here: KFP reads the components' annotations as types.)
"""


from typing import List

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from mltag.kubeflow.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def list_images(images: str, shards: int, listing: Output[Dataset]) -> List[int]:
    """Expand ``images`` (a folder, a glob or a list file, as ``mltag predict`` takes them) into a list file;
    return the shard numbers to fan out over."""
    from pathlib import Path

    from mltag.data.listing import expand_images

    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    paths, _ = expand_images([images])
    out = Path(listing.path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images.txt").write_text("".join(p + "\n" for p in paths), encoding="utf-8")
    listing.metadata["images"] = len(paths)
    return list(range(min(shards, max(1, len(paths)))))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def predict_shard(listing: Input[Dataset], shard_index: int, shards: int, model: str, tracking_uri: str,
                  predictions: Output[Dataset]):
    """Predict one contiguous slice of the list into this task's CSV (rows in the list's order)."""
    from pathlib import Path

    from mltag.kubeflow.entry import shard_slice
    from mltag.tools.predict import predict

    paths = Path(listing.path, "images.txt").read_text(encoding="utf-8").splitlines()
    mine = paths[shard_slice(len(paths), shards, shard_index)]
    out = Path(predictions.path)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.csv", "w", encoding="utf-8", newline="") as f:
        ok, failed = predict(model, mine, out_format="csv", out=f, tracking_uri=tracking_uri or None,
                             progress=False, expand=False) if mine else (0, 0)
    predictions.metadata.update({"shard": shard_index, "images": len(mine), "ok": ok, "failed": failed})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gather_predictions(parts: Input[List[Dataset]], predictions: Output[Dataset]):
    """The shards' CSVs as one, in shard order, one header: streamed, never all in memory."""
    from pathlib import Path

    out = Path(predictions.path)
    out.mkdir(parents=True, exist_ok=True)
    ordered = sorted(parts, key=lambda p: int(p.metadata.get("shard", 0)))
    rows = 0
    with open(out / "predictions.csv", "w", encoding="utf-8", newline="") as dest:
        for i, part in enumerate(ordered):
            with open(Path(part.path) / "predictions.csv", encoding="utf-8") as src:
                header = src.readline()
                if i == 0:
                    dest.write(header)
                for line in src:
                    dest.write(line)
                    rows += 1
    predictions.metadata["images"] = rows


def build_batch_pipeline(parallelism: int = 4):
    """The ``@dsl.pipeline`` function: ``images`` (a folder, glob or list file every pod sees, or a bucket
    prefix mounted as one), ``model`` (``models:/NAME@champion``, or a model folder), ``shards``."""

    @dsl.pipeline(name="mltag-batch-predict", description="Label a list of images with a registered model")
    def batch_predict(images: str, model: str, shards: int = 4, tracking_uri: str = "") -> Dataset:
        listed = list_images(images=images, shards=shards)
        with dsl.ParallelFor(listed.outputs["Output"], parallelism=parallelism) as shard:
            part = predict_shard(listing=listed.outputs["listing"], shard_index=shard, shards=shards, model=model,
                                 tracking_uri=tracking_uri)
        return gather_predictions(parts=dsl.Collected(part.outputs["predictions"])).outputs["predictions"]

    return batch_predict


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def drift_check(images: str, model: str, bottlenecks: str, store: str, alpha: float, tracking_uri: str,
                report: Output[HTML], metrics: Output[Metrics]) -> bool:
    """``mltag drift`` on ``images`` (a folder or bucket prefix every pod sees): the report as an HTML
    artifact, its figures as metrics; returns whether drift was found (a later task can branch on it)."""
    import shutil
    from pathlib import Path

    from mltag.tools.drift import drift

    out = Path(report.path).parent / "drift"
    r = drift(model, [images], out, bottlenecks=bottlenecks, store=store, alpha=alpha,
              tracking_uri=tracking_uri or None, progress=False)
    shutil.copy(out / "drift.html", report.path)
    for key in ("p_value", "auc", "mmd2"):
        metrics.log_metric(f"drift_{key}", float(r["vectors"][key]))
    metrics.log_metric("drift_found", float(r["drift"]))
    return bool(r["drift"])


def build_drift_pipeline():
    """A one-task pipeline for a recurring run: ``images`` (the folder or prefix new photos land in),
    ``model``, ``bottlenecks`` (the model's bottleneck folder) and ``store`` (the vector store), all as
    every pod sees them."""

    @dsl.pipeline(name="mltag-drift", description="Do new images still look like the training images?")
    def drift_pipeline(images: str, model: str, bottlenecks: str, store: str, alpha: float = 0.01,
                       tracking_uri: str = "") -> bool:
        return drift_check(images=images, model=model, bottlenecks=bottlenecks, store=store, alpha=alpha,
                           tracking_uri=tracking_uri).outputs["Output"]

    return drift_pipeline
