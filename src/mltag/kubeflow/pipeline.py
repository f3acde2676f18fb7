"""The Kubeflow Pipelines v2 DAG: prepare -> bottleneck (sharded) -> train -> evaluate -> calibrate -> register.

The pipeline's parameters are the params.yaml sections the steps read, one dict each
(``prepare``, ``backbone``, ``bottleneck``, ``train``, ``evaluate``, ``calibrate``,
``tracking``, ``register``), defaulting to the compiled params file; a run may pass any
subset of a section's keys. ``data_repo``/``data_rev`` name a DVC-versioned dataset and
``tracking_uri`` the MLflow server. Cluster placement (GPU node pool, secret
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

from kfp import dsl, kubernetes

from mltag.config import STEP_SECTIONS, Params, load_params
from mltag.kubeflow import components as steps

# CPU/memory requests per step (the GPU step's figures are for the host side).
RESOURCES = {
    "resolve_data": ("100m", "256Mi"), "prepare": ("1", "2Gi"), "shard_indices": ("100m", "256Mi"), "bottleneck_shard": ("2", "6Gi"),
    "bottleneck": ("1", "4Gi"), "train": ("2", "8Gi"), "evaluate": ("1", "4Gi"), "calibrate": ("500m", "2Gi"),
    "register": ("1", "4Gi"), "review": ("500m", "2Gi"),
}

MLFLOW_SECRET_KEYS = {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
                      "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                      "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}


def _resources(task, name: str):
    cpu, mem = RESOURCES[name]
    return task.set_cpu_request(cpu).set_memory_request(mem).set_display_name(name)


def gpu_tasks(params: Params) -> set[str]:
    """Which tasks the compiled pipeline puts on the GPU pool, from ``train.mode`` and ``pipeline``."""
    from mltag.errors import MltagError

    out = {"train"} if params.train.mode == "fine_tune" else set()
    if params.pipeline.bottleneck_on_gpu:
        if params.bottleneck.engine == "litert":
            raise MltagError("pipeline.bottleneck_on_gpu needs bottleneck.engine tf or auto (LiteRT runs on CPU)")
        out.add("bottleneck_shard")
    return out


def no_nulls(section: dict) -> dict:
    return {k: v for k, v in section.items() if v is not None}


# The sections the pipeline takes as parameters: every one a step reads (demo-data does not run here).
PIPELINE_SECTIONS = tuple(dict.fromkeys(s for step, secs in STEP_SECTIONS.items() if step != "demo-data"
                                        for s in secs))


def store_mount(params: Params, local: bool = False) -> tuple[str, str] | None:
    """``(pvc, mount path)`` for the tasks that touch the vector store, or None (a bucket URI, a pod-local store).

    An absolute ``bottleneck.cache_dir`` on a cluster is a folder every pod must see: without
    ``pipeline.store_pvc`` each pod would write its own and the gather would compute it all
    again, so that is an error here. A local run (kfp.local) shares this machine's folders.
    """
    from pathlib import PurePosixPath

    from mltag.data.fetch import is_remote
    from mltag.errors import MltagError

    store, pvc = params.bottleneck.cache_dir, params.pipeline.store_pvc
    if is_remote(store):
        return None
    absolute = PurePosixPath(store.removeprefix("file://")).is_absolute()
    if pvc and not absolute:
        raise MltagError(f"pipeline.store_pvc {pvc!r} is mounted at bottleneck.cache_dir, which must then be an "
                         f"absolute path (the mount point), not {store!r}")
    if absolute and not pvc and not local:
        raise MltagError(f"bottleneck.cache_dir is the absolute path {store!r}, but nothing mounts a volume there, so "
                         "every pod would keep its own store: set pipeline.store_pvc to a PersistentVolumeClaim "
                         "(ReadWriteMany) to mount there, or make the store a bucket URI (gs://..., s3://...)")
    return (pvc, store.removeprefix("file://")) if absolute and pvc else None


class _Placement:
    """Where and how each task runs: resources, the GPU pool, the vector store's volume, MLflow's secret."""

    def __init__(self, kf, on_gpu, mount):
        self.kf, self.on_gpu, self.mount = kf, on_gpu, mount

    def res(self, task, name: str):
        """CPU/memory requests, the display name, and the retry policy: ``pipeline.retries`` tries more after a
        failure (a preempted spot node, an evicted pod), the first after ``pipeline.retry_backoff`` seconds, each
        next one twice as late. Every step is safe to run again on the same inputs (atomic outputs, a
        content-addressed vector store, a registry keyed by content hash)."""
        _resources(task, name)
        if self.kf.retries > 0:
            task.set_retry(int(self.kf.retries), backoff_duration=f"{int(self.kf.retry_backoff)}s", backoff_factor=2.0)
        return task

    def place(self, task, name: str):
        """``res``, and for the GPU tasks the accelerator, node pool, image and fail-fast check."""
        kf = self.kf
        self.res(task, name)
        if name in self.on_gpu:
            task.set_accelerator_type(kf.accelerator_type).set_accelerator_limit(int(kf.gpu_count))
            kubernetes.add_node_selector(task, kf.gpu_node_label_key, kf.gpu_node_label_value)
            kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
            if kf.gpu_image:
                task.set_container_image(str(kf.gpu_image))
            task.set_env_variable("MLTAG_REQUIRE_GPU", "0" if kf.allow_cpu else "1")
        return task

    def with_store(self, task):
        """Mount the vector store's volume on a task that reads or writes it."""
        if self.mount is not None:
            kubernetes.mount_pvc(task, pvc_name=self.mount[0], mount_path=self.mount[1])
        return task

    def mlflow_env(self, task):
        if self.kf.mlflow_secret:
            # optional=True: without the secret the steps use the tracking_uri parameter.
            kubernetes.use_secret_as_env(task, self.kf.mlflow_secret, MLFLOW_SECRET_KEYS, optional=True)
        return task


def _vectors(placement: _Placement, parallelism: int, collect_shards: bool, dataset, bottleneck, backbone,
             defaults: dict):
    """The bottleneck shards in parallel, then their gather: the task whose ``bottlenecks`` the later steps read."""
    shards = placement.res(steps.shard_indices(bottleneck=bottleneck, defaults=defaults),
                        "shard_indices")
    with dsl.ParallelFor(shards.output, parallelism=parallelism) as shard:
        part = placement.with_store(placement.place(steps.bottleneck_shard(
            dataset=dataset, shard_index=shard, bottleneck=bottleneck, backbone=backbone,
            defaults=defaults), "bottleneck_shard"))
    if collect_shards:  # fan-in of the shards' artifacts: KFP backend 2.5 or newer
        gathered = placement.with_store(placement.res(steps.bottleneck(
            dataset=dataset, shard_caches=dsl.Collected(part.outputs["cache"]),
            bottleneck=bottleneck, backbone=backbone, defaults=defaults), "bottleneck"))
    else:  # any v2 backend: wait for the whole loop, then read the shared store
        gathered = placement.with_store(placement.res(steps.bottleneck_from_store(
            dataset=dataset, bottleneck=bottleneck, backbone=backbone,
            defaults=defaults).after(part), "bottleneck"))
    return gathered


def build_pipeline(params: Params | None = None, local: bool = False):
    """Return the ``@dsl.pipeline`` function with defaults and placement taken from ``params``.

    ``local``: for kfp.local, where every task sees this machine's folders (no volume to mount).
    """
    p = params or load_params(None)
    kf = p.pipeline
    on_gpu, mount = gpu_tasks(p), store_mount(p, local)
    if not kf.collect_shards:
        from mltag.kubeflow.entry import require_shared_store

        require_shared_store(p)  # checked again at run time, where a run may pass another store
    # KFP parameters cannot hold null: a key whose value is null is left out, and a step
    # reading the section gets that key's declared default, which for the optional keys is null.
    d = {s: no_nulls(v) for s, v in p.to_dict().items()}

    def defaults(step: str) -> dict:
        """Every key of the sections ``step`` reads, as compiled (not only the output-changing ones:
        where the store lives and which engine runs are compiled settings too)."""
        return {s: d[s] for s in STEP_SECTIONS[step]}

    placement = _Placement(kf, on_gpu, mount)
    place, mlflow_env = placement.place, placement.mlflow_env

    @dsl.pipeline(name="mltag", description="Multi-label image classification by transfer learning")
    def mltag_pipeline(
        prepare: dict = d["prepare"],
        backbone: dict = d["backbone"],
        bottleneck: dict = d["bottleneck"],
        train: dict = d["train"],
        evaluate: dict = d["evaluate"],
        calibrate: dict = d["calibrate"],
        review: dict = d["review"],
        tracking: dict = d["tracking"],
        register: dict = d["register"],
        data_repo: str = "",
        data_rev: str = "",
        tracking_uri: str = "",
    ):
        version = mlflow_env(placement.res(steps.resolve_data(prepare=prepare, defaults=defaults("prepare"),
                                                           data_repo=data_repo, data_rev=data_rev,
                                                           tracking_uri=tracking_uri), "resolve_data"))
        # A branch, bucket or folder can move under the same name: resolve it on every run,
        # and let prepare be cached on the resolved, immutable version only.
        version.set_caching_options(False)
        prep = placement.res(steps.prepare(prepare=prepare, defaults=defaults("prepare"), data_repo=data_repo,
                                        data_version=version.output), "prepare")
        gathered = _vectors(placement, int(kf.parallelism), kf.collect_shards, prep.outputs["dataset"], bottleneck,
                            backbone, defaults("bottleneck"))
        trained = mlflow_env(placement.with_store(place(steps.train(
            bottlenecks=gathered.outputs["bottlenecks"], dataset=prep.outputs["dataset"], train=train,
            backbone=backbone, tracking=tracking, defaults=defaults("train"), tracking_uri=tracking_uri,
            store=bottleneck, store_default=d["bottleneck"]["cache_dir"]), "train")))
        run_id = trained.outputs["run_id"]
        evaluated = placement.res(steps.evaluate(
            model=trained.outputs["model"], bottlenecks=gathered.outputs["bottlenecks"],
            dataset=prep.outputs["dataset"], evaluate=evaluate, defaults=defaults("evaluate")), "evaluate")
        calibrated = placement.res(steps.calibrate(
            evaluation=evaluated.outputs["evaluation"], model=trained.outputs["model"],
            bottlenecks=gathered.outputs["bottlenecks"], calibrate=calibrate, defaults=defaults("calibrate")),
            "calibrate")
        # review on CPU from calibrate's out-of-fold scores; none of these three opens MLflow: register logs
        # their figures into train's run, so it runs last
        reviewed = placement.res(steps.review(
            thresholds=calibrated.outputs["thresholds"], model=trained.outputs["model"],
            dataset=prep.outputs["dataset"], review=review, defaults=defaults("review")), "review")
        registered = mlflow_env(placement.res(steps.register(
            model=trained.outputs["model"], thresholds=calibrated.outputs["thresholds"],
            dataset=prep.outputs["dataset"], bottlenecks=gathered.outputs["bottlenecks"],
            evaluation=evaluated.outputs["evaluation"], issues=reviewed.outputs["issues"], run_id=run_id,
            register=register, tracking=tracking, defaults=defaults("register"), tracking_uri=tracking_uri), "register"))
        # The registry is shared state: a cached "success" would skip a real registration.
        registered.set_caching_options(False)

    return mltag_pipeline
