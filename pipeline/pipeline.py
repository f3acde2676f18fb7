"""The Kubeflow Pipelines v2 DAG: prepare -> bottleneck (sharded) -> train -> evaluate -> calibrate -> register.

Runtime parameters default from params.yaml; cluster placement (GPU node pool, secret
name, resources) is fixed at compile time from the ``pipeline`` section of params.yaml,
and so is ``train.mode``, because it decides where the GPU goes:

* ``train.mode: fine_tune``: the train step runs the backbone, so it gets the GPU
  (accelerator, node selector, toleration, ``pipeline.gpu_image``).
* ``train.mode: head``: train fits a dense layer on cached vectors; it stays on CPU.
* ``pipeline.bottleneck_on_gpu: true`` (with ``bottleneck.engine: tf``) puts the
  bottleneck shards on the GPU pool.

A GPU task fails at once when it finds no usable GPU (``MLTAG_REQUIRE_GPU=1``) unless
``pipeline.allow_cpu`` is true.
"""

from pathlib import Path

from kfp import dsl, kubernetes

from components import steps

REPO = Path(__file__).resolve().parents[1]

# CPU/memory requests per step (the GPU step's figures are for the host side).
RESOURCES = {
    "prepare": ("1", "2Gi"), "shard_indices": ("100m", "256Mi"), "bottleneck_shard": ("2", "6Gi"),
    "bottleneck": ("1", "4Gi"), "train": ("2", "8Gi"), "evaluate": ("1", "4Gi"), "calibrate": ("500m", "2Gi"),
    "register": ("1", "4Gi"),
}

MLFLOW_SECRET_KEYS = {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
                      "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                      "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}


def _resources(task, name: str):
    cpu, mem = RESOURCES[name]
    return task.set_cpu_request(cpu).set_memory_request(mem).set_display_name(name)


def gpu_tasks(params: dict) -> set[str]:
    """Which tasks the compiled pipeline puts on the GPU pool, from ``train.mode`` and ``pipeline``."""
    from mltag.common import MltagError

    tr, bn, kf = params["train"], params["bottleneck"], params["pipeline"]
    if tr["mode"] not in ("head", "fine_tune"):
        raise MltagError(f"train.mode must be head or fine_tune, got {tr['mode']!r}")
    out = {"train"} if tr["mode"] == "fine_tune" else set()
    if kf["bottleneck_on_gpu"]:
        if bn["engine"] == "litert":
            raise MltagError("pipeline.bottleneck_on_gpu needs bottleneck.engine tf or auto (LiteRT runs on CPU)")
        out.add("bottleneck_shard")
    return out


def build_pipeline(params: dict | None = None):
    """Return the ``@dsl.pipeline`` function with defaults and placement taken from ``params``."""
    from mltag.config import load_params

    p = params or load_params(REPO / "params.yaml")
    pre, bb, bn, tr, ev, ca, rg, kf = (p[k] for k in (
        "prepare", "backbone", "bottleneck", "train", "evaluate", "calibrate", "register", "pipeline"))
    on_gpu = gpu_tasks(p)

    def place(task, name: str):
        """CPU/memory requests, and for the GPU tasks the accelerator, node pool, image and fail-fast check."""
        _resources(task, name)
        if name in on_gpu:
            task.set_accelerator_type(kf["accelerator_type"]).set_accelerator_limit(int(kf["gpu_count"]))
            kubernetes.add_node_selector(task, kf["gpu_node_label_key"], kf["gpu_node_label_value"])
            kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
            if kf["gpu_image"]:
                task.set_container_image(str(kf["gpu_image"]))
            task.set_env_variable("MLTAG_REQUIRE_GPU", "0" if kf["allow_cpu"] else "1")
        return task

    def mlflow_env(task):
        if kf["mlflow_secret"]:
            # optional=True: without the secret the steps use the tracking_uri parameter.
            kubernetes.use_secret_as_env(task, kf["mlflow_secret"], MLFLOW_SECRET_KEYS, optional=True)
        return task

    @dsl.pipeline(name="mltag", description="Multi-label image classification by transfer learning")
    def mltag_pipeline(
        data: str = str(pre["input"]),
        data_repo: str = "",
        data_rev: str = "",
        data_format: str = str(pre["format"]),
        val_fraction: float = float(pre["val_fraction"]),
        test_fraction: float = float(pre["test_fraction"]),
        no_label: str = str(pre["no_label"]),
        max_bad_fraction: float = float(pre["max_bad_fraction"]),
        salt: str = str(pre["salt"]),
        backbone_handle: str = str(bb["handle"]),
        image_size: int = int(bb["image_size"]),
        bottleneck_batch_size: int = int(bn["batch_size"]),
        num_shards: int = int(bn["num_shards"]),
        bottleneck_engine: str = str(bn["engine"]),
        views: int = int(bn["views"]),
        learning_rate: float = float(tr["learning_rate"]),
        epochs: int = int(tr["epochs"]),
        batch_size: int = int(tr["batch_size"]),
        hidden_units: int = int(tr["hidden_units"]),
        dropout: float = float(tr["dropout"]),
        patience: int = int(tr["patience"]),
        monitor: str = str(tr["monitor"]),
        seed: int = int(tr["seed"]),
        fine_tune_blocks: int = int(tr["fine_tune_blocks"]),
        fine_tune_epochs: int = int(tr["fine_tune_epochs"]),
        fine_tune_learning_rate: float = float(tr["fine_tune_learning_rate"]),
        fine_tune_patience: int = int(tr["fine_tune_patience"]),
        mixed_precision: str = str(tr["mixed_precision"]).lower(),
        bootstrap: int = int(ev["bootstrap"]),
        calibrate_method: str = str(ca["method"]),
        min_precision: float = -1.0 if ca["min_precision"] is None else float(ca["min_precision"]),
        min_positives: int = int(ca["min_positives"]),
        cv_folds: int = int(ca["cv_folds"]),
        shrink: float = float(ca["shrink"]),
        min_gain: float = float(ca["min_gain"]),
        model_name: str = str(rg["model_name"]),
        experiment: str = str(rg["experiment"]),
        margin: float = float(rg["margin"]),
        max_label_ap_drop: float = float(rg["max_label_ap_drop"]),
        tflite: bool = bool(rg["tflite"]),
        tracking_uri: str = "",
    ):
        prep = _resources(steps.prepare(
            data=data, data_repo=data_repo, data_rev=data_rev, data_format=data_format, val_fraction=val_fraction,
            test_fraction=test_fraction, no_label=no_label, max_bad_fraction=max_bad_fraction, salt=salt), "prepare")
        shards = _resources(steps.shard_indices(num_shards=num_shards), "shard_indices")
        with dsl.ParallelFor(shards.output, parallelism=int(kf["parallelism"])) as shard:
            part = place(steps.bottleneck_shard(
                dataset=prep.outputs["dataset"], shard_index=shard, num_shards=num_shards,
                backbone_handle=backbone_handle, image_size=image_size, batch_size=bottleneck_batch_size,
                engine=bottleneck_engine, views=views), "bottleneck_shard")
        gathered = _resources(steps.bottleneck(
            dataset=prep.outputs["dataset"], shard_caches=dsl.Collected(part.outputs["cache"]),
            backbone_handle=backbone_handle, image_size=image_size, batch_size=bottleneck_batch_size,
            engine=bottleneck_engine, views=views), "bottleneck")
        trained = place(steps.train(
            bottlenecks=gathered.outputs["bottlenecks"], dataset=prep.outputs["dataset"], mode=str(tr["mode"]),
            learning_rate=learning_rate, epochs=epochs, batch_size=batch_size, hidden_units=hidden_units,
            dropout=dropout, patience=patience, monitor=monitor, seed=seed, fine_tune_blocks=fine_tune_blocks,
            fine_tune_epochs=fine_tune_epochs, fine_tune_learning_rate=fine_tune_learning_rate,
            fine_tune_patience=fine_tune_patience, mixed_precision=mixed_precision, experiment=experiment,
            tracking_uri=tracking_uri), "train")
        mlflow_env(trained)
        run_id = trained.outputs["run_id"]
        evaluated = mlflow_env(_resources(steps.evaluate(
            model=trained.outputs["model"], bottlenecks=gathered.outputs["bottlenecks"],
            dataset=prep.outputs["dataset"], run_id=run_id, bootstrap=bootstrap, seed=int(ev["seed"]),
            tracking_uri=tracking_uri), "evaluate"))
        calibrated = mlflow_env(_resources(steps.calibrate(
            evaluation=evaluated.outputs["evaluation"], model=trained.outputs["model"],
            bottlenecks=gathered.outputs["bottlenecks"], run_id=run_id, method=calibrate_method,
            min_precision=min_precision, min_positives=min_positives, cv_folds=cv_folds, shrink=shrink,
            min_gain=min_gain, tracking_uri=tracking_uri), "calibrate"))
        registered = mlflow_env(_resources(steps.register(
            model=trained.outputs["model"], thresholds=calibrated.outputs["thresholds"],
            dataset=prep.outputs["dataset"], run_id=run_id, model_name=model_name, experiment=experiment,
            margin=margin, max_label_ap_drop=max_label_ap_drop, tflite=tflite, tracking_uri=tracking_uri),
            "register"))
        # The registry is shared state: a cached "success" would skip a real registration.
        registered.set_caching_options(False)

    return mltag_pipeline
