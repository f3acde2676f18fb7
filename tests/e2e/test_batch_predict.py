"""Batch prediction as a Kubeflow pipeline of its own, run through kfp.local: 2,000 images in 4 shards,
gathered into one predictions file in the list's order, the same rows as `mltag predict`."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from conftest import colour_image
from mltag.config import sections
from mltag.steps.bottleneck import bottleneck
from mltag.steps.prepare import prepare
from mltag.steps.train import train

pytestmark = pytest.mark.slow


def trained(tmp_path, dataset, backbone) -> None:
    """A model in tmp_path/model, its bottlenecks in tmp_path/bn and their vector store in tmp_path/store."""
    prepare(tmp_path / "prepared", **sections("prepare", input=dataset), progress=False)
    bottleneck(tmp_path / "prepared", tmp_path / "bn", **sections("bottleneck", handle=str(backbone),
               cache_dir=tmp_path / "store", views=1), progress=False)
    train(tmp_path / "bn", tmp_path / "model", **sections("train", learning_rate=0.05, epochs=150), progress=False)


def test_batch_prediction_shards_2000_images_over_4_tasks_into_one_file_in_order(tmp_path, colour_dataset,
                                                                                 fake_backbone, mlflow_store):
    from mltag.kubeflow.entry import shard_slice
    from mltag.kubeflow.run import run_batch_local
    from mltag.tools.predict import predict

    trained(tmp_path, colour_dataset, fake_backbone)
    new = tmp_path / "new"
    new.mkdir()
    rng = np.random.default_rng(5)
    for i in range(2000):
        colour_image(tuple(int(x) for x in rng.random(3) < 0.5), rng).save(new / f"{i:05d}.jpg", quality=90)

    out = run_batch_local(str(new), str(tmp_path / "model"), shards=4, pipeline_root=str(tmp_path / "kfp"))
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(new / f"{i:05d}.jpg") for i in range(2000)]
    assert not any(r["error"] for r in rows)
    parts = sorted(p for p in (tmp_path / "kfp").rglob("predict-shard*/predictions/predictions.csv"))
    assert len(parts) == 4 and sum(1 for p in parts for _ in p.open()) == 2000 + 4  # a header each
    one = io.StringIO()
    predict(str(tmp_path / "model"), [str(new)], out_format="csv", out=one, progress=False)
    assert [r["labels"] for r in csv.DictReader(io.StringIO(one.getvalue()))] == [r["labels"] for r in rows]
    assert [len(range(2000)[shard_slice(2000, 4, k)]) for k in range(4)] == [500, 500, 500, 500]


def test_the_drift_pipeline_runs_mltag_drift_as_one_task_and_returns_whether_it_found_drift(
        tmp_path, colour_dataset, fake_backbone, mlflow_store):
    from kfp import local
    from PIL import Image, ImageEnhance

    from mltag.kubeflow.batch import build_drift_pipeline

    trained(tmp_path, colour_dataset, fake_backbone)
    dark = tmp_path / "dark"
    dark.mkdir()
    for f in sorted((colour_dataset / "images").iterdir()):
        ImageEnhance.Brightness(Image.open(f)).enhance(0.3).save(dark / f.name, quality=90)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    task = build_drift_pipeline()(images=str(dark), model=str(tmp_path / "model"), bottlenecks=str(tmp_path / "bn"),
                                  store=str(tmp_path / "store"))
    assert task.output is True
    (page,) = list((tmp_path / "kfp").rglob("report"))
    assert "Drift: found" in page.read_text()
