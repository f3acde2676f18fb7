"""bottleneck: one cached feature vector per image (plus optional augmented training views).

The vectors come from the vector store (``mltag.data.store``); the missing ones are computed in
lanes (``mltag.inference.lanes``). This module is the step: which vectors each split needs, and the
split files handed to train (``formats.write_split``).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from pathlib import Path

import numpy as np

from mltag import config
from mltag.data.formats import (
    SPLITS,
    image_root_of,
    load_hashes,
    load_prepared,
    write_bottleneck_meta,
    write_labels,
    write_split,
)
from mltag.data.images import PREPROCESSING_VERSION
from mltag.data.store import FeatureCache
from mltag.errors import MltagError
from mltag.files import atomic_path, write_json_atomic
from mltag.inference.lanes import compute_missing, hash_files

log = logging.getLogger(__name__)


def bottleneck(prepared: str | os.PathLike, out: str | os.PathLike, *, bottleneck: config.Bottleneck,
               backbone: config.Backbone, images: str | os.PathLike | None = None, shard_index: int = 0,
               extra_caches: list | None = None, progress: bool = True, metrics: str | os.PathLike | None = None,
               config: dict | None = None) -> dict:
    """Run the bottleneck step.

    Args:
        bottleneck, backbone: the typed params sections. ``backbone.image_size`` 0 takes the
            built-in's own size (224/240/260), 224 otherwise. ``bottleneck.views`` is the number
            of vectors per training image: the plain one plus ``views - 1`` deterministic
            augmented views (crop, flip, colour), each cached by content like the plain one;
            validation and test images only ever get the plain view.
        images: the image root when it is not the prepared folder's, or a ``fetch.ImageSource``
            (a bucket or DVC repo): then only the images whose vectors are computed are downloaded.
        config: what the vectors depend on (the output-changing keys), recorded in bottleneck.json.

    With ``bottleneck.num_shards > 1`` only the vectors whose cache key falls in shard ``shard_index``
    are computed into ``cache_dir`` (stable when images are added) and no split files are
    written: that is one shard of a scaled-out run, gathered by a later call that lists the
    shard caches in ``extra_caches``.

    Writes ``out/bottleneck.json`` (what the vectors depend on) and, when ``metrics`` is given, how many
    vectors this run computed and read from the cache there; returns both with this run's statistics.
    """
    from mltag.backbones import builtin as bb
    from mltag.data.fetch import ImageSource
    from mltag.inference.engine import require_gpu

    require_gpu("bottleneck")
    num_shards, views, handle = bottleneck.num_shards, bottleneck.views, backbone.handle
    if not 0 <= shard_index < num_shards:
        raise MltagError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    image_size = backbone.image_size or bb.default_image_size(handle)
    # int8 is another backbone: its own id, so its own store keys and LiteRT file
    resolved = bb.with_precision(bb.resolve(handle, backbone.cache_dir), backbone.precision)
    source = images if isinstance(images, ImageSource) else None  # a bucket or DVC repo, read by reference
    root = source.scratch if source else Path(images) if images else image_root_of(prepared)
    cache = FeatureCache(bottleneck.cache_dir, resolved.backbone_id, image_size, extra_caches)
    labels, splits = load_prepared(prepared, "train")[0], {s: load_prepared(prepared, s)[1] for s in SPLITS}
    t0 = time.time()
    all_ex = sorted({ex.path: ex for s in SPLITS for ex in splits[s]}.values(), key=lambda e: e.path)
    files = [root / ex.path for ex in all_ex]
    shas = _image_hashes(prepared, all_ex, files, source)
    train_paths = {ex.path for ex in splits["train"]}
    keys, todo, seen = _plan(all_ex, files, shas, train_paths, views, cache, num_shards, shard_index)
    loaded: dict[str, np.ndarray] = {}  # vectors read or computed once: the split files below need them again
    computed, seconds, used_engine = _compute(todo, cache, loaded if num_shards == 1 else None, root, source,
                                              resolved, image_size, bottleneck, backbone, shard_index, progress)
    # bottleneck.json (a DVC output) holds only what the vectors depend on, so a rerun on
    # unchanged data leaves the output byte-identical; run statistics go to ``metrics``.
    summary = {"backbone_handle": handle, "backbone_id": resolved.backbone_id, "precision": backbone.precision,
               "image_size": image_size, "preprocessing": PREPROCESSING_VERSION, "views": views,
               "images": len(all_ex), "config": config}
    stats = {
        "shard": [shard_index, num_shards],
        "computed": computed,
        "cached": len(seen) - computed,
        "untrusted_entries": cache.rejected,
        "engine": used_engine,
        "seconds": round(time.time() - t0, 2),
        "images_per_second": round(computed / seconds, 1) if computed and seconds > 0 else None,
    }
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        if num_shards == 1:
            summary["feature_dim"] = _write_splits(tmp, splits, labels, keys, loaded, cache, views)
            write_labels(tmp / "labels.txt", labels)
        write_bottleneck_meta(tmp, summary)
    if metrics:  # the headline: how many vectors this run computed (the rest is in the returned summary)
        write_json_atomic(metrics, {"computed": stats["computed"], "cached": stats["cached"]})
    summary.update(stats)
    _say(stats, cache.rejected)
    return summary


def _say(stats: dict, rejected: int) -> None:
    rate = f", {stats['images_per_second']} vectors/s ({stats['engine']})" if stats["images_per_second"] else ""
    log.info("bottleneck: %d computed, %d from cache%s", stats["computed"], stats["cached"], rate)
    if rejected:
        log.warning("bottleneck: %d damaged cache entries were recomputed", rejected)


def _image_hashes(prepared, all_ex: list, files: list[Path], source) -> list[str]:
    """Each image's SHA-256: as prepare recorded it (then no image is read here unless its vector is
    computed, and its hash is checked against the record, see ``decode_view``), else read now."""
    recorded = load_hashes(prepared)
    if recorded is not None and all(ex.path in recorded for ex in all_ex):
        return [recorded[ex.path] for ex in all_ex]
    if source:
        source.localize([ex.path for ex in all_ex])
    for ex, p in zip(all_ex, files):
        if not p.is_file():
            raise MltagError(f"image not found: {p}", ex.source)
    return hash_files(files)


def _plan(all_ex: list, files: list[Path], shas: list[str], train_paths: set, views: int, cache,
          num_shards: int, shard_index: int) -> tuple[dict[str, list[str]], list[tuple], set[str]]:
    """Each image's cache keys (its plain view, and for a training image its augmented ones), this shard's
    jobs ``(key, path, source, sha, view)`` and their keys. A key's shard is fixed by the key, so it stays
    when images are added."""
    keys: dict[str, list[str]] = {}
    todo, seen = [], set()
    for ex, p, sha in zip(all_ex, files, shas):
        n_views = views if ex.path in train_paths else 1
        keys[ex.path] = [cache.key(sha, v) for v in range(n_views)]
        for v, key in enumerate(keys[ex.path]):
            if key in seen or (num_shards > 1 and int(key[:8], 16) % num_shards != shard_index):
                continue
            seen.add(key)
            todo.append((key, str(p), ex.source, sha, v))
    return keys, todo, seen


def _uncached(jobs: list, cache, loaded: dict | None) -> list:
    """The jobs whose vector the cache lacks; the others' vectors go to ``loaded`` (when given)."""
    found = cache.get_many([job[0] for job in jobs])  # each pack read once, whatever the shards' order
    missing = []
    for job in jobs:
        vec = found.get(job[0])
        if vec is None:
            missing.append(job)
        elif loaded is not None:
            loaded[job[0]] = vec
    return missing


def _compute(todo: list, cache, loaded: dict | None, root: Path, source, resolved, image_size: int,
             bottleneck: config.Bottleneck, backbone: config.Backbone, shard_index: int,
             progress: bool) -> tuple[int, float, str | None]:
    """Compute the vectors the cache lacks. Returns ``(computed, seconds computing, engine name)``."""
    from mltag.inference.engine import backbone_engine

    todo = _uncached(todo, cache, loaded)
    if not todo:
        return 0, 0.0, None
    num_shards = bottleneck.num_shards
    # One run computes into a cache at a time (per shard): a second run waits, then finds
    # the first run's vectors instead of computing them again.
    with cache.lock(".lock" if num_shards == 1 else f".lock-shard{shard_index}-of-{num_shards}") as waited:
        if waited:  # the other run's packs are new since the first look
            cache.refresh()
            todo = _uncached(todo, cache, loaded)
        cache.clean_leftovers()
        if not todo:
            return 0, 0.0, None
        if source:  # only the images whose vectors are computed travel
            source.localize([Path(job[1]).relative_to(root).as_posix() for job in todo])
        made = []

        def make_engine():
            made.append(backbone_engine(bottleneck.engine, resolved, image_size, backbone.cache_dir, lanes=True))
            return made[0]

        t_compute = time.time()
        # The split files need the computed vectors too: kept, not read back.
        computed = compute_missing(todo, cache, None, image_size, bottleneck.batch_size, progress,
                                   make_engine=make_engine, keep=loaded)
        return computed, time.time() - t_compute, made[0].name if made else None


def _write_splits(tmp: Path, splits: dict, labels: list[str], keys: dict, loaded: dict, cache, views: int) -> int:
    """The split files from the vectors (``loaded`` first, then the cache). Returns the vector size."""
    dim = None

    wanted = [k for s in SPLITS for ex in splits[s] for k in keys[ex.path][: 1 if s != "train" else None]]
    stored = cache.get_many([k for k in set(wanted) if k not in loaded])  # each pack once (the gather: many shards)
    # identical images under two names share their keys: a vector is let go at its last use, not its first
    uses = collections.Counter(wanted)

    def vector(ex, key):
        uses[key] -= 1
        held = loaded if key in loaded else stored
        v = held.pop(key, None) if uses[key] <= 0 else held.get(key)
        if v is None:
            raise MltagError(f"no cached vector for {ex.path} (was a shard missing?)", ex.source)
        return v

    for s in SPLITS:
        exs = splits[s]
        vecs = [vector(ex, keys[ex.path][0]) for ex in exs]
        dim = dim or (vecs[0].shape[-1] if vecs else None)
        feats = np.stack(vecs) if vecs else np.zeros((0, dim or 0), np.float16)
        flags = np.array([ex.flags for ex in exs], np.uint8).reshape(len(exs), len(labels))
        extra = None
        if s == "train" and views > 1:
            extra = np.stack([np.stack([vector(ex, k) for k in keys[ex.path][1:]]) for ex in exs]) \
                if exs else np.zeros((0, views - 1, dim or 0), np.float16)
        write_split(tmp, s, feats, flags, [ex.path for ex in exs], extra)
    return int(dim or 0)
