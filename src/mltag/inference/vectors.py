"""Image files to their plain-view vectors through the vector store (suggest, drift): cached by content,
so a second look at the same folder computes nothing."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np

from mltag.errors import MltagError
from mltag.workers import cpu_threads


def list_images(spec: str) -> list[Path]:
    """A folder (searched recursively), a glob pattern, or a text file listing one image per line."""
    from mltag.data.images import IMAGE_EXTENSIONS

    p = Path(spec)
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
    elif p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS:
        from mltag.files import read_user_text

        found = []
        for n, line in enumerate(read_user_text(p).splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                f = (p.parent / line.strip()) if not Path(line.strip()).is_absolute() else Path(line.strip())
                if not f.is_file():
                    raise MltagError(f"image not found: {f}", p, n)
                found.append(f)
    else:
        found = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    if not found:
        raise MltagError("no images found (give a folder, a glob such as 'new/*.jpg', or a file listing images)",
                         spec)
    return found


def vectors_for(files: list[Path], meta: dict, store: str, backbone_cache_dir: str = "", engine: str = "auto",
                progress: bool = True, skip_bad: dict | None = None) -> tuple[np.ndarray, int]:
    """The plain-view vectors of ``files`` from the vector store, computing the missing ones into it.

    ``skip_bad``: a dict that receives ``{path: why}`` for each image that cannot be read, which is then
    left out (its row too); without it, such an image fails the call.

    Returns ``(vectors float32 [N, D], how many were computed)``.
    """
    from mltag.backbones import builtin as bb
    from mltag.data.store import FeatureCache
    from mltag.inference.engine import backbone_engine
    from mltag.inference.lanes import compute_missing, hash_files

    resolved = bb.resolve(meta["backbone_handle"], backbone_cache_dir)
    if resolved.backbone_id != meta.get("backbone_id"):
        raise MltagError(f"the model's backbone {meta.get('backbone_id')} is not the one {meta['backbone_handle']} "
                         f"resolves to here ({resolved.backbone_id})")
    size = int(meta["image_size"])
    cache = FeatureCache(store, resolved.backbone_id, size)
    shas = hash_files(files)
    keys = [cache.key(sha, 0) for sha in shas]
    got = {k: v for k in dict.fromkeys(keys) if (v := cache.get(k)) is not None}
    todo, seen = [], set(got)
    for key, f, sha in zip(keys, files, shas):
        if key not in seen:
            seen.add(key)
            todo.append((key, str(f), str(f), sha, 0))
    from_store = len(got)
    bad: dict[str, str] = {}
    while todo:
        try:
            with cache.lock(".lock"):
                cache.clean_leftovers()
                compute_missing(todo, cache, None, size, 32, progress, keep=got,
                                            make_engine=lambda: backbone_engine(engine, resolved, size,
                                                                                backbone_cache_dir,
                                                                                lanes=cpu_threads() > 1))
            break
        except MltagError as e:  # an unreadable image: with skip_bad, leave it out and go on with the rest
            where = str(e.path) if e.path is not None else None
            if skip_bad is None or where not in {t[1] for t in todo}:
                raise
            bad[where] = e.message
            todo = [t for t in todo if t[1] != where and t[0] not in got]
    computed = len(got) - from_store  # a failed pass keeps what it computed (in the store and in ``got``)
    if skip_bad is not None:
        skip_bad.update(bad)
    rows = [np.asarray(got[k], np.float32) for k, f in zip(keys, files) if str(f) not in bad]
    return (np.stack(rows) if rows else np.zeros((0, 0), np.float32)), computed
