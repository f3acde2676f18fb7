"""bottleneck: one cached feature vector per image.

Cache key = image content hash + backbone id + image size + preprocessing version,
so adding images computes only the new ones and a changed backbone or resize never
reuses stale vectors. Entries are float16 ``.npy`` files written atomically
(temp file + rename): an interrupted run never leaves a truncated entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from mltag.common import MltagError, atomic_path, sha256_file, write_labels
from mltag.images import PREPROCESSING_VERSION, BadImage, load_image
from mltag.prepare import SPLITS, image_root_of, load_prepared


class FeatureCache:
    """A directory of ``<key>.npy`` float16 vectors, plus read-only extra directories."""

    def __init__(self, root: str | os.PathLike, backbone_id: str, image_size: int, extra: list | None = None):
        self.root = Path(root)
        self.prefix = f"{backbone_id}|{image_size}|{PREPROCESSING_VERSION}|"
        self.extra = [Path(p) for p in (extra or [])]

    def key(self, content_sha: str) -> str:
        return hashlib.sha256((self.prefix + content_sha).encode()).hexdigest()

    def _path(self, root: Path, key: str) -> Path:
        return root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        for root in (self.root, *self.extra):
            p = self._path(root, key)
            if p.is_file():
                try:
                    return np.load(p, allow_pickle=False)
                except (ValueError, OSError, EOFError):
                    continue  # unreadable entry: recompute rather than trust it
        return None

    def put(self, key: str, vector: np.ndarray) -> None:
        p = self._path(self.root, key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, vector.astype(np.float16))
        os.replace(tmp, p)


def _feature_model(location: str):
    from mltag.backbone import Backbone, load

    module = load(Backbone(location, location, ""))
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def run(images_uint8):
        return module(tf.cast(images_uint8, tf.float32) / 255.0)

    return run


def compute_missing(items: list[tuple[str, str, str]], cache: FeatureCache, location: str, image_size: int,
                    batch_size: int = 32, progress: bool = True) -> int:
    """Compute and cache vectors for ``(key, image path, source)`` items; return how many were computed.

    Decoding and resizing run in parallel in a tf.data pipeline, overlapped with the
    backbone on whole batches.
    """
    if not items:
        return 0
    import tensorflow as tf
    from tqdm import tqdm

    run = _feature_model(location)
    paths = [p for _, p, _ in items]
    sources = {p: s for _, p, s in items}

    def decode(path):
        p = path.decode() if isinstance(path, bytes) else str(path)
        try:
            return load_image(p, image_size)
        except BadImage as e:
            raise MltagError(f"{p}: {e}", sources.get(p)) from None

    ds = tf.data.Dataset.from_tensor_slices(paths)
    ds = ds.map(lambda p: tf.ensure_shape(tf.numpy_function(decode, [p], tf.uint8), [image_size, image_size, 3]),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    done = 0
    bar = tqdm(total=len(items), desc="bottleneck", unit="img", disable=not progress, mininterval=1.0)
    try:
        for batch in ds:
            feats = run(batch).numpy()
            for vec in feats:
                cache.put(items[done][0], vec)
                done += 1
            bar.update(len(feats))
    except tf.errors.InvalidArgumentError as e:
        raise MltagError(f"image decoding failed: {str(e).splitlines()[0][:300]}") from None
    finally:
        bar.close()
    return done


def bottleneck(prepared: str | os.PathLike, out: str | os.PathLike, handle: str = "builtin:efficientnet_lite0",
               cache_dir: str | os.PathLike = ".mltag-cache/bottlenecks",
               backbone_cache: str | os.PathLike = ".mltag-cache/backbones", image_size: int = 224,
               batch_size: int = 32, images: str | os.PathLike | None = None, shard_index: int = 0,
               num_shards: int = 1, extra_caches: list | None = None, progress: bool = True) -> dict:
    """Run the bottleneck step.

    With ``num_shards > 1`` only every ``num_shards``-th image (from ``shard_index``) is
    computed into ``cache_dir`` and no split files are written: that is one shard of a
    scaled-out run, gathered by a later call that lists the shard caches in ``extra_caches``.

    Returns:
        Summary dict (also written to ``out/bottleneck.json``).
    """
    from mltag import backbone as bb

    if not 0 <= shard_index < num_shards:
        raise MltagError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    resolved = bb.resolve(handle, backbone_cache)
    root = Path(images) if images else image_root_of(prepared)
    cache = FeatureCache(cache_dir, resolved.backbone_id, image_size, extra_caches)
    splits = {}
    for s in SPLITS:
        labels, exs = load_prepared(prepared, s)
        splits[s] = exs
    t0 = time.time()
    keys: dict[str, str] = {}
    todo, seen = [], set()
    all_ex = sorted({ex.path: ex for s in SPLITS for ex in splits[s]}.values(), key=lambda e: e.path)
    for i, ex in enumerate(all_ex):
        p = root / ex.path
        if not p.is_file():
            raise MltagError(f"image not found: {p}", ex.source)
        keys[ex.path] = key = cache.key(sha256_file(p))
        if i % num_shards != shard_index or key in seen:
            continue
        seen.add(key)
        if cache.get(key) is None:
            todo.append((key, str(p), ex.source))
    t_hash = time.time()
    computed = compute_missing(todo, cache, resolved.location, image_size, batch_size, progress)
    seconds = time.time() - t_hash
    summary = {
        "backbone_handle": handle,
        "backbone_id": resolved.backbone_id,
        "image_size": image_size,
        "preprocessing": PREPROCESSING_VERSION,
        "images": len(all_ex),
        "computed": computed,
        "cached": len(seen) - computed,
        "shard": [shard_index, num_shards],
        "seconds": round(time.time() - t0, 2),
        "images_per_second": round(computed / seconds, 1) if computed and seconds > 0 else None,
    }
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        if num_shards == 1:
            dim = None
            for s in SPLITS:
                exs = splits[s]
                vecs = []
                for ex in exs:
                    v = cache.get(keys[ex.path])
                    if v is None:
                        raise MltagError(f"no cached vector for {ex.path} (was a shard missing?)", ex.source)
                    vecs.append(v)
                dim = dim or (vecs[0].shape[-1] if vecs else None)
                feats = np.stack(vecs).astype(np.float16) if vecs else np.zeros((0, dim or 0), np.float16)
                np.savez(tmp / f"{s}.npz", features=feats,
                         labels=np.array([ex.flags for ex in exs], np.uint8).reshape(len(exs), len(labels)),
                         paths=np.array([ex.path for ex in exs], dtype=str))
            summary["feature_dim"] = int(dim or 0)
            write_labels(tmp / "labels.txt", labels)
        (tmp / "bottleneck.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    rate = f", {summary['images_per_second']} img/s" if summary["images_per_second"] else ""
    print(f"bottleneck: {computed} computed, {summary['cached']} from cache{rate}")
    return summary


def load_split(bottlenecks: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(features float32, labels uint8, paths)`` for one split."""
    f = Path(bottlenecks) / f"{split}.npz"
    if not f.is_file():
        raise MltagError("bottleneck file not found; run the bottleneck step first", f)
    with np.load(f, allow_pickle=False) as z:
        return z["features"].astype(np.float32), z["labels"], z["paths"]
