"""What a component body calls: the step's typed config from the pipeline's section dicts.

A section dict given to a run overrides the compiled defaults key by key, so
``train={"epochs": 50}`` changes one value and keeps the rest of the compiled params.yaml.
"""

from __future__ import annotations

import os

from mltag.config import STEP_SECTIONS, Params, params_from_dict
from mltag.errors import MltagError


def params_for(step: str, given: dict, defaults: dict) -> Params:
    """The compiled ``defaults`` of ``step``'s sections overlaid with this run's ``given`` values.

    In a container the built backbones live where the image put them (``MLTAG_BACKBONE_CACHE``),
    whatever ``backbone.cache_dir`` says.
    """
    p = params_from_dict(defaults, "compiled params")
    extra = set(given) - set(STEP_SECTIONS[step])
    if extra:
        raise MltagError(f"step {step} does not read section(s) {', '.join(sorted(extra))}")
    p = params_from_dict({k: v or {} for k, v in given.items()}, f"pipeline parameters of {step}", base=p)
    if "backbone" in STEP_SECTIONS[step]:
        p = p.replace("backbone", cache_dir=os.environ.get("MLTAG_BACKBONE_CACHE", "/tmp/mltag-backbones"))
    return p


def check_fixed_mode(params: Params, defaults: dict) -> None:
    """train.mode decides GPU placement when compiling: a run may not change it."""
    compiled = defaults["train"]["mode"]
    if params.train.mode != compiled:
        raise MltagError(f"train.mode is {params.train.mode!r} but the pipeline was compiled for {compiled!r}, "
                         "which decides where the GPU goes; recompile with `mltag pipeline compile --params FILE`")


def _shared(location: str) -> bool:
    """Whether every pod sees ``location``: an fsspec URI, or an absolute path (``file://`` or not: a mounted PVC)."""
    from pathlib import Path

    from mltag.data.fetch import is_remote

    return is_remote(location) or Path(location.removeprefix("file://")).is_absolute()


def shared_store(params: Params) -> str | None:
    """``bottleneck.cache_dir`` when every pod sees the same one; None for a relative path, which on a cluster lives
    only as long as its pod."""
    store = params.bottleneck.cache_dir
    return store if _shared(store) else None


def cluster_checkpoints(checkpoint_dir: str, store: dict, store_default: str) -> str:
    """Where fine-tuning checkpoints go on a cluster, so that a retried pod (another node) finds them: an fsspec URI
    or absolute path as given; a relative one (the default) as ``checkpoints/`` in the shared vector store
    (``store``: the run's bottleneck section, whose volume the train task mounts); none without a shared store."""
    import logging

    if not checkpoint_dir or _shared(checkpoint_dir):
        return checkpoint_dir
    root = (store or {}).get("cache_dir") or store_default
    if _shared(root):
        return f"{root.rstrip('/')}/checkpoints"
    logging.getLogger(__name__).warning(
        "train: no shared vector store (bottleneck.cache_dir %r), so fine-tuning's checkpoints stay in this pod and "
        "a retry starts over; set train.checkpoint_dir to a bucket URI to keep them", root)
    return ""


def images_of(dataset_dir):
    """The image root of a dataset artifact: a local Path, or a ``fetch.ImageSource`` to download from."""
    from pathlib import Path

    from mltag.data.fetch import ImageSource, is_remote
    from mltag.data.formats import read_images_ref

    ref = read_images_ref(dataset_dir)
    if ref["repo"] or is_remote(ref["root"]):
        return ImageSource(ref["root"], ref["repo"], ref["rev"])
    return Path(ref["root"])


def images_for(dataset_dir, splits: dict):
    """A local image root holding at least the images of ``splits`` (``{split: at most N, or None: all}``):
    a remote source downloads just those."""
    from pathlib import Path

    from mltag.data.formats import load_prepared

    src = images_of(dataset_dir)
    if isinstance(src, Path):
        return src
    rels = []
    for split, limit in splits.items():
        _, examples = load_prepared(Path(dataset_dir) / "prepared", split)
        rels += [ex.path for ex in examples[:limit]]
    return src.localize(rels)


def check_cluster_tracking(tracking_uri: str) -> None:
    """On Kubernetes, a missing tracking URI would give each pod its own throwaway store: stop at once."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise MltagError(
            "no MLflow tracking URI on a Kubernetes cluster: every pod would log to its own throwaway "
            "sqlite file and later steps could not find train's run. Pass the pipeline parameter "
            "tracking_uri (mltag pipeline run --tracking-uri http://mlflow.mlflow.svc:5000), or create the "
            "secret named by pipeline.mlflow_secret: kubectl create secret generic mlflow-tracking "
            "--from-literal=MLFLOW_TRACKING_URI=http://mlflow.mlflow.svc:5000")


def gather_vectors(dataset_dir, out, params: Params, shard_dirs: list) -> dict:
    """The gather step's body: the split files from the shared store, or else from the shards' artifacts.

    Returns:
        The output artifact's metadata: backbone id, vectors computed here (0 when every shard
        succeeded), and the shared store (empty without one).
    """
    from pathlib import Path

    from mltag.steps import run_step

    store = shared_store(params)
    params = params.replace("bottleneck", num_shards=1)  # the gather writes the split files from every shard
    extra = []
    if store is None:
        params = params.replace("bottleneck", cache_dir="/tmp/mltag-gather")
        extra = [Path(d) / "vectors" for d in shard_dirs]
    out = Path(out)
    s = run_step("bottleneck", params, prepared=Path(dataset_dir) / "prepared", out=out, images=images_of(dataset_dir),
                 extra_caches=extra, progress=False, metrics=out / "stats.json")
    return {"backbone_id": s["backbone_id"], "computed_at_gather": s["computed"], "store": store or ""}


def require_shared_store(params: Params) -> None:
    if shared_store(params) is None:
        raise MltagError(
            f"pipeline.collect_shards false needs a vector store every pod sees, but bottleneck.cache_dir is "
            f"{params.bottleneck.cache_dir!r}: set it to an fsspec URI (s3://..., gs://...) or an absolute "
            "path on a volume mounted in every bottleneck pod")


def shard_slice(n: int, shards: int, index: int) -> slice:
    """Shard ``index``'s contiguous part of ``n`` items (batch prediction): sizes differ by at most one, and
    the shards in order are the items in order."""
    return slice(n * index // shards, n * (index + 1) // shards)
