"""Computing vectors: decoding views, hashing files, and running the engine in lanes (one
single-threaded LiteRT interpreter per core), fed by a decode pool, into the vector store."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mltag.data.images import BadImage, augmented_view, load_image
from mltag.data.store import PACK_MAX, FeatureCache
from mltag.errors import MltagError
from mltag.files import fault_point, sha256_file
from mltag.workers import cpu_threads, imap_ordered

log = logging.getLogger(__name__)


def view_seed(content_sha: str, view: int) -> int:
    """The augmentation seed of one view: fixed by the image's content and the view number."""
    return int.from_bytes(hashlib.sha256(f"{content_sha}|{view}".encode()).digest()[:8], "little")


def decode_view(path, sha: str, view: int, image_size: int, source: str | None = None) -> np.ndarray:
    """The pixels of view ``view`` of an image: 0 the plain one, else a deterministic augmented one."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise MltagError("image not found" if str(source) == str(path) else f"image not found: {path}", source) from None
    if hashlib.sha256(data).hexdigest() != sha:
        raise MltagError(f"{path} changed since prepare hashed it; run prepare again", source)
    try:
        if view == 0:
            return load_image(data, image_size)
        return augmented_view(data, image_size, view_seed(sha, view))
    except BadImage as e:  # the path once: as the error's place when that is the image itself
        raise MltagError(str(e) if str(source) == str(path) else f"{path}: {e}", source) from None


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
    writes = _PackWriter(cache)

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
        writes.put(keys, feats)
        done += len(batch)
        bar.update(len(batch))

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
        writes.close()
        bar.close()
    writes.check()
    return done


class _PackWriter:
    """A thread that stores computed vectors in the vector store, the batches that queued up behind one
    going into the same pack (up to ``PACK_MAX`` vectors). A failed write is raised at the next ``put``
    or at ``check``; the thread keeps taking batches meanwhile, so the engine never blocks on a full queue."""

    def __init__(self, cache: FeatureCache):
        self.cache, self.errors = cache, []
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.thread = threading.Thread(target=self._run, name="mltag-cache-writer", daemon=True)
        self.thread.start()

    def put(self, keys: list[str], feats: np.ndarray) -> None:
        self.queue.put((keys, feats))
        self.check()

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self.queue.put(None)
        self.thread.join()

    def _run(self) -> None:
        last = False
        while not last and (item := self.queue.get()) is not None:
            keys, feats = list(item[0]), [item[1]]
            while len(keys) < PACK_MAX:  # batches that queued up meanwhile go into the same pack
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    last = True
                    break
                keys += more[0]
                feats.append(more[1])
            if self.errors:
                continue
            try:
                self.cache.put_many(keys, np.concatenate(feats))
            except BaseException as e:  # noqa: BLE001 - re-raised in the computing thread
                self.errors.append(e)
            fault_point("bottleneck:written")  # a kill here leaves some packs written, the rest not


def _run_in_lanes(items, lanes: list, finish) -> None:
    """Run decoded ``(batch, pixels)`` items image by image in lanes (``in_lanes``), and call
    ``finish(batch, vectors)`` as soon as a batch's last image is done.

    Each lane takes the next image whichever batch it is in, so no lane waits for another.
    Against one interpreter with a thread per core fed by the same decode pool, the step with
    Lite0 went from 264 to 282 images/s on the demo scenes (medians of 12 interleaved
    fresh-process pairs, faster in 10) and from 242 to 276 on real flower photos (6 pairs), and
    the process used less CPU: the threads of one interpreter spin at the end of every layer
    while a decode holds the core one of them needs.
    """
    batches = []

    def images():
        for batch, pixels in items:  # waits for the decode; the other lanes would too
            fault_point("bottleneck:batch")
            batches.append(batch)
            for j in range(len(batch)):
                yield pixels[j: j + 1]

    vectors = []
    for vector in in_lanes(images(), lanes, lambda run, pixels: run(pixels)[0]):
        vectors.append(vector)
        if len(vectors) == len(batches[0]):
            finish(batches.pop(0), np.stack(vectors))
            vectors = []


def in_lanes(items: Iterable, lanes: list[Callable], work: Callable, ahead: int | None = None) -> Iterator:
    """``work(run, item)`` for each item, yielded in input order, each item taken by whichever lane
    (one thread per runner ``run`` of ``lanes``) is free: the one scheduler of the bottleneck step and
    of predict.

    ``items`` is advanced under a lock (it may wait for a decode). At most ``ahead`` results (default
    four per lane) wait for the caller, so memory stays flat when the caller is slower than the
    lanes. A lane's error is raised here; closing the generator (Ctrl-C, an error in the caller)
    stops every lane after its current item.
    """
    ahead = ahead or 4 * len(lanes)
    todo = enumerate(items)
    lock, ready, stop = threading.Lock(), threading.Condition(), threading.Event()
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    taken = [0]  # the next index the caller takes

    def lane(run):
        try:
            while not stop.is_set():
                with lock:
                    nxt = next(todo, None)
                if nxt is None:
                    return
                i, item = nxt
                with ready:
                    while i - taken[0] >= ahead and not stop.is_set():
                        ready.wait(0.5)
                out = work(run, item)  # releases the GIL: the lanes run side by side
                with ready:
                    results[i] = out
                    ready.notify_all()
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            with ready:
                errors.append(e)
                ready.notify_all()
            stop.set()

    threads = [threading.Thread(target=lane, args=(run,), name=f"mltag-lane{n}", daemon=True)
               for n, run in enumerate(lanes)]
    for th in threads:
        th.start()
    try:
        while True:
            with ready:
                while taken[0] not in results and not errors and any(th.is_alive() for th in threads):
                    ready.wait(0.5)
                if errors:
                    raise errors[0]
                if taken[0] not in results:
                    return  # every lane has ended: no item is left
                out = results.pop(taken[0])
                taken[0] += 1
                ready.notify_all()
            yield out
    finally:
        stop.set()
        with ready:
            ready.notify_all()
        for th in threads:
            th.join()


def hash_files(paths: list[Path], workers: int | None = None) -> list[str]:
    """SHA-256 of each file, in parallel (hashlib releases the GIL on large buffers)."""
    with ThreadPoolExecutor(workers or 2 * cpu_threads()) as pool:
        return list(pool.map(sha256_file, paths))
