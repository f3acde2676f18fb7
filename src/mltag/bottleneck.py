"""bottleneck: one cached feature vector per image (plus optional augmented training views).

Cache key = image content hash + backbone id + image size + preprocessing version (+ the
view number for augmented views), so adding images computes only the new ones and a
changed backbone or resize never reuses stale vectors. The engine (LiteRT or TF) is not
in the key: both give the same float16 vectors (tests/test_engine.py checks it on real
photos). Vectors are stored float16, a batch per pack file written atomically (temp file
+ rename) by a writer thread, so an interrupted run never leaves a truncated entry, disk
writes never stall the backbone, and a vector costs no file of its own. Entries that do
not check out (checksum, size, non-finite values) are treated as missing and recomputed.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np

from mltag.common import (
    MltagError,
    atomic_path,
    cpu_threads,
    fault_point,
    imap_ordered,
    locked,
    remove_stale_leftovers,
    sha256_file,
    write_json_atomic,
    write_labels,
)
from mltag.fetch import is_remote
from mltag.formats import SPLITS, image_root_of, load_hashes, load_prepared, load_split, load_views  # noqa: F401
from mltag.images import PREPROCESSING_VERSION, BadImage, augmented_view, load_image

log = logging.getLogger(__name__)


CACHE_FORMAT = "3"  # packs of vectors with checksummed keys; part of the key, so older entries are misses
PACK_MAGIC = b"MLTAGPK1"
PACK_MAX = 256  # vectors per pack file at most: a longer batch is split
_HEAD = struct.Struct("<8sII8s")  # magic, count, dim, checksum of (count, dim, key table)
_ENTRY = 32 + 8  # one key (a SHA-256 digest) and its entry's checksum, in the key table


def _checksum(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=8).digest()


def pack_bytes(keys: list[str], vectors) -> bytes:
    """One pack file: header, key table (each key with a checksum of key and values), float16 values.

    The header's checksum covers the count, the size and the key table, so a damaged table is
    never read as other keys; each entry's checksum covers its key and its values, so bit rot
    in one vector costs only that vector.
    """
    vecs = np.ascontiguousarray(vectors, dtype=np.float16).reshape(len(keys), -1)
    count, dim = vecs.shape
    raw = [bytes.fromhex(k) for k in keys]
    table = b"".join(raw) + b"".join(_checksum(r + v.tobytes()) for r, v in zip(raw, vecs, strict=True))
    sizes = struct.pack("<II", count, dim)
    return _HEAD.pack(PACK_MAGIC, count, dim, _checksum(sizes + table)) + table + vecs.tobytes()


def read_pack_table(head: bytes) -> tuple[int, list[tuple[str, bytes]]] | None:
    """``(dim, [(key, entry checksum)...])`` from the start of a pack file; None unless it checks out."""
    if len(head) < _HEAD.size:
        return None
    magic, count, dim, check = _HEAD.unpack_from(head)
    end = _HEAD.size + _ENTRY * count
    if magic != PACK_MAGIC or not 0 < count <= PACK_MAX or dim == 0 or len(head) < end:
        return None
    table = head[_HEAD.size: end]
    if _checksum(struct.pack("<II", count, dim) + table) != check:
        return None
    return dim, [(table[32 * i: 32 * i + 32].hex(), table[32 * count + 8 * i: 32 * count + 8 * i + 8])
                 for i in range(count)]


def _pack_locations(root, path: str, head: bytes) -> list[tuple[str, tuple]] | None:
    """``[(key, (root, pack, offset of its values, dim, entry checksum))...]`` for the index; None
    unless the pack's key table checks out."""
    table = read_pack_table(head)
    if table is None:
        return None
    dim, entries = table
    base = _HEAD.size + _ENTRY * len(entries)
    return [(key, (root, path, base + 2 * dim * i, dim, check)) for i, (key, check) in enumerate(entries)]


class FeatureCache:
    """A vector store: float16 vectors by key, in pack files under ``<root>/packs/``, plus read-only extra roots.

    Each write stores one batch as one pack file, written whole through a temp name and a
    rename (or as one object in a bucket), so a killed run leaves whole packs and nothing
    torn, and a batch costs one file instead of one per vector. An entry whose checksum,
    size or values (non-finite) do not check out is a miss, counted in ``rejected``, and
    recomputed: bit rot or a partial overwrite is never trusted.
    """

    def __init__(self, root: str | os.PathLike, backbone_id: str, image_size: int, extra: list | None = None):
        self.remote = None  # an fsspec filesystem when ``root`` is a URI (s3://, gs://, memory://...)
        if is_remote(str(root)):
            import fsspec

            self.remote, base = fsspec.core.url_to_fs(str(root))
            self.root = PurePosixPath(base)
        else:
            self.root = Path(str(root).removeprefix("file://"))
        self.prefix = f"{backbone_id}|{image_size}|{PREPROCESSING_VERSION}|cache{CACHE_FORMAT}|"
        self.extra = [Path(p) for p in (extra or [])]
        self.dim: int | None = None
        self._rejected: set[str] = set()  # keys whose stored entries were read but none trusted
        self._damaged_packs: set[str] = set()  # pack files whose header or key table does not check out
        self._index: dict[str, list[tuple]] | None = None  # key -> [(root, pack, offset, dim, checksum)]
        self._recent: collections.OrderedDict[str, bytes] = collections.OrderedDict()  # packs read last
        self._dir_made = False

    @property
    def rejected(self) -> int:
        """How many entries were read but not trusted (each counted once; a pack whose key table
        is damaged counts once, its keys being unknown)."""
        return len(self._rejected) + len(self._damaged_packs)

    def key(self, content_sha: str, view: int = 0) -> str:
        """The plain vector's key, or with ``view > 0`` the key of augmented view number ``view``."""
        suffix = f"|view{view}" if view else ""
        return hashlib.sha256((self.prefix + content_sha + suffix).encode()).hexdigest()

    def _packs(self, root) -> list[str]:
        """The pack files under ``root`` (none when it does not exist yet)."""
        folder = root / "packs"
        try:
            if self.remote is not None and root is self.root:
                return sorted(p for p in self.remote.ls(str(folder), detail=False) if p.endswith(".pack"))
            return sorted(e.path for e in os.scandir(folder) if e.name.endswith(".pack") and e.name[0] != ".")
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise MltagError(f"cannot list the feature cache: {e.strerror or e}", str(folder)) from None

    def _heads(self, root, paths: list[str]) -> list[bytes | None]:
        """The start of each pack (enough for its key table); None for one that vanished meanwhile."""
        size = _HEAD.size + _ENTRY * PACK_MAX
        if self.remote is not None and root is self.root:  # one request each, concurrent where the store allows
            heads = self.remote.cat_ranges(paths, [0] * len(paths), [size] * len(paths), on_error="return")
            return [None if isinstance(h, FileNotFoundError) else b"" if isinstance(h, Exception) else h
                    for h in heads]
        out = []
        for path in paths:
            try:
                with open(path, "rb") as f:
                    out.append(f.read(size))
            except FileNotFoundError:
                out.append(None)
            except OSError:
                out.append(b"")
        return out

    def _pack(self, root, path: str) -> bytes:
        """A whole pack file, from the few read last (a run reads its vectors mostly in the order
        they were written, so one read serves a pack's vectors, and a bucket one request)."""
        data = self._recent.pop(path, None)
        if data is None:
            if self.remote is not None and root is self.root:
                data = self.remote.cat_file(path)
            else:
                with open(path, "rb") as f:
                    data = f.read()
        self._recent[path] = data
        while len(self._recent) > 8:
            self._recent.popitem(last=False)
        return data

    def _locations(self) -> dict[str, list[tuple]]:
        """The index of every pack's key table, read once (and again after ``refresh``)."""
        if self._index is None:
            index: dict[str, list[tuple]] = {}
            for root in (self.root, *self.extra):
                paths = self._packs(root)
                for path, head in zip(paths, self._heads(root, paths), strict=True):
                    if head is None:
                        continue
                    located = _pack_locations(root, path, head)
                    if located is None:
                        self._damaged_packs.add(path)
                        continue
                    for key, loc in located:
                        index.setdefault(key, []).append(loc)
            self._index = index
        return self._index

    def refresh(self) -> None:
        """Forget the index: the next read lists the packs again (after another run wrote some)."""
        self._index = None
        self._damaged_packs.clear()
        self._recent.clear()
        if self.remote is not None:
            self.remote.invalidate_cache(str(self.root / "packs"))

    def locations(self) -> dict[str, tuple[str, int]]:
        """Where each stored key's (first) entry lies: ``(pack file, offset of its values)``."""
        return {k: (locs[0][1], locs[0][2]) for k, locs in self._locations().items()}

    def get(self, key: str) -> np.ndarray | None:
        damaged = False
        for root, path, offset, dim, check in self._locations().get(key, ()):
            try:
                body = self._pack(root, path)[offset: offset + 2 * dim]
            except FileNotFoundError:
                continue
            except OSError:
                body = b""
            if (self.dim is not None and dim != self.dim) or len(body) != 2 * dim \
                    or _checksum(bytes.fromhex(key) + body) != check:
                damaged = True
                continue
            v = np.frombuffer(body, np.float16)
            if not np.isfinite(v).all():
                damaged = True
                continue
            self.dim = self.dim or dim
            return v
        if damaged:  # recomputed rather than trusted
            self._rejected.add(key)
        return None

    def put(self, key: str, vector: np.ndarray) -> None:
        self.put_many([key], np.asarray(vector)[None])

    def put_many(self, keys: list[str], vectors) -> None:
        """Store a batch of vectors (one pack file per ``PACK_MAX`` of them)."""
        vectors = np.asarray(vectors)
        for i in range(0, len(keys), PACK_MAX):
            self._write_pack(keys[i: i + PACK_MAX], vectors[i: i + PACK_MAX])

    def _write_pack(self, keys: list[str], vectors: np.ndarray) -> None:
        data = pack_bytes(keys, vectors)
        name = f"{hashlib.blake2b(data, digest_size=12).hexdigest()}.pack"  # by content: a rewrite is the same file
        folder = self.root / "packs"
        path = folder / name
        if self.remote is not None:
            # An object store writes an object whole or not at all; on any other fsspec
            # filesystem a torn write fails the checksums on read and is recomputed.
            try:
                self.remote.pipe_file(str(path), data)
            except OSError as e:
                raise MltagError(f"cannot write the vector store: {e}", str(path)) from None
        else:
            if not self._dir_made:
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise MltagError(f"cannot write the feature cache: {e.strerror or e}", folder) from None
                self._dir_made = True
            tmp = folder / f".{name}.{os.getpid()}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise MltagError(f"cannot write the feature cache: {e.strerror or e}", path) from None
        if self._index is not None:  # read from now on, before older copies of the same keys
            for key, loc in _pack_locations(self.root, str(path), data):
                self._index.setdefault(key, []).insert(0, loc)

    def lock(self, name: str):
        """A lock on this cache (one run computes into it at a time); none for a URI store,
        where entries are written whole by key and two writers of one key write the same vector.
        Entered, it gives whether it waited for another run (whose vectors may now be cached)."""
        if self.remote is not None:
            return contextlib.nullcontext(False)
        return locked(self.root / name, f"the feature cache {self.root}")

    def clean_leftovers(self) -> int:
        """Remove what killed runs left (temp packs, e.g. 0-byte ones after a full disk) and packs
        whose key table is damaged (their entries are misses anyway). Call it holding the lock."""
        if self.remote is not None:
            return 0  # nothing is written through a temp name there
        removed = remove_stale_leftovers(self.root / "packs")
        for path in sorted(self._damaged_packs):
            if Path(path).parent == self.root / "packs":  # never in a read-only extra cache
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed += 1
                    log.info("removed a damaged pack of the feature cache: %s", path)
        return removed


def view_seed(content_sha: str, view: int) -> int:
    """The augmentation seed of one view: fixed by the image's content and the view number."""
    return int.from_bytes(hashlib.sha256(f"{content_sha}|{view}".encode()).digest()[:8], "little")


def decode_view(path, sha: str, view: int, image_size: int, source: str | None = None) -> np.ndarray:
    """The pixels of view ``view`` of an image: 0 the plain one, else a deterministic augmented one."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise MltagError(f"image not found: {path}", source) from None
    if hashlib.sha256(data).hexdigest() != sha:
        raise MltagError(f"{path} changed since prepare hashed it; run prepare again", source)
    try:
        if view == 0:
            return load_image(data, image_size)
        return augmented_view(data, image_size, view_seed(sha, view))
    except BadImage as e:
        raise MltagError(f"{path}: {e}", source) from None


def _decode(job, image_size: int) -> np.ndarray:
    key, path, source, sha, view = job
    return decode_view(path, sha, view, image_size, source)


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """How ``n`` jobs are cut into batches: 1, 2, 4, ... up to ``batch_size``, then ``batch_size``.

    The short first batches start the engine after one image's decode instead of a whole
    batch's (32 images are about 20 ms of one core), and cost nothing: LiteRT runs one image
    per invoke anyway, and TF traces at most twice (its function relaxes the batch dimension).
    """
    sizes, size = [], 1
    while n > 0:
        sizes.append(min(size, batch_size, n))
        n -= sizes[-1]
        size *= 2
    return sizes


def compute_missing(jobs: list[tuple[str, str, str, str, int]], cache: FeatureCache, engine, image_size: int,
                    batch_size: int = 32, progress: bool = True, workers: int | None = None, *,
                    make_engine=None, keep: dict | None = None) -> int:
    """Compute and cache vectors for ``(key, image path, source, content sha, view)`` jobs.

    Decoding runs in a thread pool (Pillow releases the GIL) a bounded window ahead of
    the engine, and a writer thread stores the vectors, so memory stays flat however
    many images there are. An engine with several ``lanes()`` (LiteRT on CPU: one
    single-threaded interpreter per core) gets a thread per lane, each taking the next
    decoded image (see ``_run_in_lanes``); any other engine (TF, on a GPU above all) is
    called on whole batches. Instead of ``engine`` (then None), ``make_engine`` may give a
    function without arguments that makes one: it is called once decoding has started, so
    loading the engine overlaps the first decodes. With ``keep``, each computed float16
    vector is also put there by key (for a caller that needs them next, instead of reading
    them back). Returns how many vectors were computed.
    """
    if not jobs:
        return 0
    from tqdm import tqdm

    workers = workers or cpu_threads()
    writes: queue.Queue = queue.Queue(maxsize=4)
    write_error: list[BaseException] = []

    def writer():
        last = False
        while not last and (item := writes.get()) is not None:
            keys, feats = list(item[0]), [item[1]]
            while len(keys) < PACK_MAX:  # batches that queued up meanwhile go into the same pack
                try:
                    more = writes.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    last = True
                    break
                keys += more[0]
                feats.append(more[1])
            if write_error:
                continue  # keep taking batches so the engine never blocks on a full queue
            try:
                cache.put_many(keys, np.concatenate(feats))
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                write_error.append(e)
            fault_point("bottleneck:written")  # a kill here leaves some packs written, the rest not

    def decode_batch(batch):
        out = np.empty((len(batch), image_size, image_size, 3), np.uint8)
        for i, job in enumerate(batch):
            out[i] = _decode(job, image_size)
        return out

    done = 0

    def finish(batch, vectors):
        """A batch's vectors are computed: check them, keep them, queue them for the writer."""
        nonlocal done
        with np.errstate(over="ignore"):  # beyond float16's range becomes inf: refused below
            feats = np.asarray(vectors).astype(np.float16)  # what the cache stores
        bad = ~np.isfinite(feats).all(axis=1)
        if bad.any():
            j = batch[int(np.argmax(bad))]
            raise MltagError(f"{j[1]}: the backbone returned non-finite features (or beyond float16's range)", j[2])
        keys = [jb[0] for jb in batch]
        if keep is not None:
            keep.update(zip(keys, feats))
        writes.put((keys, feats))
        if write_error:
            raise write_error[0]
        done += len(batch)
        bar.update(len(batch))

    wt = threading.Thread(target=writer, name="mltag-cache-writer", daemon=True)
    wt.start()
    bar = tqdm(total=len(jobs), desc="bottleneck", unit="img", disable=not progress, mininterval=1.0)
    # One task per batch keeps the per-image thread overhead small; a few batches in flight
    # keep the engine fed while memory stays flat.
    batches, start = [], 0
    for size in batch_sizes(len(jobs), batch_size):
        batches.append(jobs[start: start + size])
        start += size
    decoded = imap_ordered(decode_batch, batches, workers, ahead=workers + 1)
    try:
        if make_engine is not None:
            engine = make_engine()  # while the first batches decode
        lanes = engine.lanes() if callable(getattr(engine, "lanes", None)) else []
        if len(lanes) > 1:
            _run_in_lanes(zip(batches, decoded), lanes, finish)
        else:
            for batch, pixels in zip(batches, decoded):
                fault_point("bottleneck:batch")
                finish(batch, engine(pixels))
    finally:
        decoded.close()  # cancels what is queued, waits for what runs
        writes.put(None)
        wt.join()
        bar.close()
    if write_error:
        raise write_error[0]
    return done


def _run_in_lanes(items, lanes: list, finish) -> None:
    """Run decoded ``(batch, pixels)`` items image by image, one thread per lane.

    Each lane takes the next image whichever batch it is in, so no lane waits for another,
    and ``finish(batch, vectors)`` runs (under the lanes' lock) as soon as a batch's last
    image is done. Against one interpreter with a thread per core fed by the same decode
    pool, the step with Lite0 went from 264 to 282 images/s on the demo scenes (medians of
    12 interleaved fresh-process pairs, faster in 10) and from 242 to 276 on real flower
    photos (6 pairs), and the process used less CPU: the threads of one interpreter spin at
    the end of every layer while a decode holds the core one of them needs.
    """
    lock, stop, errors = threading.Lock(), threading.Event(), []
    pending: dict[int, list] = {}  # batch index -> [its vectors so far, images left, the batch]

    def images():
        """Each image as (its batch's index, its place there, its pixels); advanced under the lock."""
        for index, (batch, pixels) in enumerate(items):  # waits for the decode; the other lanes would too
            fault_point("bottleneck:batch")
            pending[index] = [[None] * len(batch), len(batch), batch]
            for j in range(len(batch)):
                yield index, j, pixels[j: j + 1]

    ordered = images()

    def lane(run):
        try:
            while True:
                with lock:
                    item = None if stop.is_set() else next(ordered, None)
                if item is None:
                    return
                index, j, pixels = item
                vector = run(pixels)[0]  # releases the GIL: the lanes run side by side
                with lock:
                    entry = pending[index]
                    entry[0][j] = vector
                    entry[1] -= 1
                    if entry[1] == 0:
                        del pending[index]
                        finish(entry[2], np.stack(entry[0]))
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=lane, args=(run,), name=f"mltag-lane{i}", daemon=True)
               for i, run in enumerate(lanes)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    finally:  # Ctrl-C here: each lane stops after its current image
        stop.set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


def hash_files(paths: list[Path], workers: int | None = None) -> list[str]:
    """SHA-256 of each file, in parallel (hashlib releases the GIL on large buffers)."""
    with ThreadPoolExecutor(workers or 2 * cpu_threads()) as pool:
        return list(pool.map(sha256_file, paths))


def bottleneck(prepared: str | os.PathLike, out: str | os.PathLike, handle: str = "builtin:efficientnet_lite2",
               cache_dir: str | os.PathLike = ".mltag-cache/bottlenecks",
               backbone_cache_dir: str | os.PathLike = "", image_size: int = 0,
               batch_size: int = 32, images: str | os.PathLike | None = None, shard_index: int = 0,
               num_shards: int = 1, extra_caches: list | None = None, progress: bool = True, *,
               engine: str = "auto", views: int = 1, metrics: str | os.PathLike | None = None,
               config: dict | None = None) -> dict:
    """Run the bottleneck step.

    Args:
        image_size: the backbone's input size; 0 takes the built-in's own (224/240/260), 224 otherwise.
        engine: ``auto`` (LiteRT on CPU, TF when a GPU is visible), ``litert`` or ``tf``.
        images: the image root when it is not the prepared folder's, or a ``fetch.ImageSource``
            (a bucket or DVC repo): then only the images whose vectors are computed are downloaded.
        views: vectors per training image: the plain one plus ``views - 1`` deterministic
            augmented views (crop, flip, colour), each cached by content like the plain one.
            Validation and test images only ever get the plain view.

    With ``num_shards > 1`` only the vectors whose cache key falls in shard ``shard_index``
    are computed into ``cache_dir`` (stable when images are added) and no split files are
    written: that is one shard of a scaled-out run, gathered by a later call that lists the
    shard caches in ``extra_caches``.

    Writes ``out/bottleneck.json`` (what the vectors depend on) and, when ``metrics`` is
    given, this run's statistics there (computed, cached, untrusted entries, seconds).

    Returns:
        Both merged into one dict.
    """
    from mltag import backbone as bb
    from mltag.engine import backbone_engine, require_gpu

    require_gpu("bottleneck")
    if not 0 <= shard_index < num_shards:
        raise MltagError(f"shard_index must be in [0, {num_shards}), got {shard_index}")
    if views < 1:
        raise MltagError(f"bottleneck.views must be at least 1, got {views}")
    image_size = int(image_size) or bb.default_image_size(handle)
    resolved = bb.resolve(handle, backbone_cache_dir)
    from mltag.fetch import ImageSource

    source = images if isinstance(images, ImageSource) else None  # a bucket or DVC repo, read by reference
    root = source.scratch if source else Path(images) if images else image_root_of(prepared)
    cache = FeatureCache(cache_dir, resolved.backbone_id, image_size, extra_caches)
    splits = {}
    for s in SPLITS:
        labels, exs = load_prepared(prepared, s)
        splits[s] = exs
    t0 = time.time()
    train_paths = {ex.path for ex in splits["train"]}
    all_ex = sorted({ex.path: ex for s in SPLITS for ex in splits[s]}.values(), key=lambda e: e.path)
    files = [root / ex.path for ex in all_ex]
    recorded = load_hashes(prepared)
    if recorded is not None and all(ex.path in recorded for ex in all_ex):
        # prepare hashed every image once: no image is read here unless its vector is computed
        # (and then its hash is checked against the record, see decode_view).
        shas = [recorded[ex.path] for ex in all_ex]
    else:
        if source:
            source.localize([ex.path for ex in all_ex])
        for ex, p in zip(all_ex, files):
            if not p.is_file():
                raise MltagError(f"image not found: {p}", ex.source)
        shas = hash_files(files)
    keys: dict[str, list[str]] = {}
    loaded: dict[str, np.ndarray] = {}

    def uncached(jobs: list) -> list:
        """The jobs whose vector the cache lacks; the others' vectors are kept for the split files."""
        missing = []
        for job in jobs:
            vec = cache.get(job[0])
            if vec is None:
                missing.append(job)
            elif num_shards == 1:
                loaded[job[0]] = vec  # read once: the split files below need it again
        return missing

    todo, seen = [], set()
    for ex, p, sha in zip(all_ex, files, shas):
        n_views = views if ex.path in train_paths else 1
        keys[ex.path] = [cache.key(sha, v) for v in range(n_views)]
        for v, key in enumerate(keys[ex.path]):
            if key in seen or (num_shards > 1 and int(key[:8], 16) % num_shards != shard_index):
                continue
            seen.add(key)
            todo.append((key, str(p), ex.source, sha, v))
    todo = uncached(todo)
    used_engine, computed, seconds = None, 0, 0.0
    if todo:
        # One run computes into a cache at a time (per shard): a second run waits, then finds
        # the first run's vectors instead of computing them again.
        with cache.lock(".lock" if num_shards == 1 else f".lock-shard{shard_index}-of-{num_shards}") as waited:
            if waited:  # the other run's packs are new since the first look
                cache.refresh()
                todo = uncached(todo)
            cache.clean_leftovers()
            if todo:
                if source:  # only the images whose vectors are computed travel
                    source.localize([Path(job[1]).relative_to(root).as_posix() for job in todo])
                made = []

                def make_engine():
                    made.append(backbone_engine(engine, resolved, image_size, backbone_cache_dir, lanes=True))
                    return made[0]

                t_compute = time.time()
                # The split files below need the computed vectors too: kept, not read back.
                computed = compute_missing(todo, cache, None, image_size, batch_size, progress,
                                           make_engine=make_engine, keep=loaded if num_shards == 1 else None)
                seconds = time.time() - t_compute
                used_engine = made[0].name if made else None
    # bottleneck.json (a DVC output) holds only what the vectors depend on, so a rerun on
    # unchanged data leaves the output byte-identical; run statistics go to ``metrics``.
    summary = {
        "backbone_handle": handle,
        "backbone_id": resolved.backbone_id,
        "image_size": image_size,
        "preprocessing": PREPROCESSING_VERSION,
        "views": views,
        "images": len(all_ex),
        "shard": [shard_index, num_shards],
        "config": config,
    }
    stats = {
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
            dim = None

            def vector(ex, key):
                v = loaded.pop(key, None)
                v = cache.get(key) if v is None else v
                if v is None:
                    raise MltagError(f"no cached vector for {ex.path} (was a shard missing?)", ex.source)
                return v

            for s in SPLITS:
                exs = splits[s]
                vecs = [vector(ex, keys[ex.path][0]) for ex in exs]
                dim = dim or (vecs[0].shape[-1] if vecs else None)
                feats = np.stack(vecs).astype(np.float16) if vecs else np.zeros((0, dim or 0), np.float16)
                arrays = {"features": feats,
                          "labels": np.array([ex.flags for ex in exs], np.uint8).reshape(len(exs), len(labels)),
                          "paths": np.array([ex.path for ex in exs], dtype=str)}
                if s == "train" and views > 1:
                    arrays["views"] = np.stack([np.stack([vector(ex, k) for k in keys[ex.path][1:]]) for ex in exs]) \
                        if exs else np.zeros((0, views - 1, dim or 0), np.float16)
                np.savez(tmp / f"{s}.npz", **arrays)
            summary["feature_dim"] = int(dim or 0)
            write_labels(tmp / "labels.txt", labels)
        (tmp / "bottleneck.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if metrics:
        write_json_atomic(metrics, stats)
    summary.update(stats)
    rate = f", {stats['images_per_second']} vectors/s ({used_engine})" if stats["images_per_second"] else ""
    log.info("bottleneck: %d computed, %d from cache%s", computed, stats["cached"], rate)
    if cache.rejected:
        log.warning("bottleneck: %d damaged cache entries were recomputed", cache.rejected)
    return summary
