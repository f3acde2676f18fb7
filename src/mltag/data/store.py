"""The vector store: one cached float16 vector per (image content, backbone, size, view),
content-addressed, in pack files written atomically, on a local folder or an fsspec URI.

Cache key = image content hash + backbone id + image size + preprocessing version (+ the
view number for augmented views), so adding images computes only the new ones and a
changed backbone or resize never reuses stale vectors. The engine (LiteRT or TF) is not
in the key: both give the same float16 vectors (tests/integration/test_engine.py checks it on real
photos). Vectors are stored float16, a batch per pack file written atomically (temp file
+ rename) by a writer thread, so an interrupted run never leaves a truncated entry, disk
writes never stall the backbone, and a vector costs no file of its own. Entries that do
not check out (checksum, size, non-finite values) are treated as missing and recomputed.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import struct
from pathlib import Path, PurePosixPath

import numpy as np

from mltag.data.fetch import is_remote
from mltag.data.images import PREPROCESSING_VERSION
from mltag.errors import MltagError
from mltag.files import locked, process_token, remove_stale_leftovers

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
        self.bytes_read = 0  # bytes of pack files read for vectors (what the gather benchmark reports)

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

    def _read_pack(self, root, path: str) -> bytes:
        """A whole pack file, read now (``bytes_read`` counts it)."""
        if self.remote is not None and root is self.root:
            data = self.remote.cat_file(path)
        else:
            with open(path, "rb") as f:
                data = f.read()
        self.bytes_read += len(data)
        return data

    def _pack(self, root, path: str) -> bytes:
        """A whole pack file, from the few read last (a run reads its vectors mostly in the order
        they were written, so one read serves a pack's vectors, and a bucket one request)."""
        data = self._recent.pop(path, None)
        if data is None:
            data = self._read_pack(root, path)
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
        return self._get(key, lambda root, path: self._pack(root, path))

    def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        """The stored vectors of ``keys`` (a missing or untrusted one is absent), reading each pack file once:
        the keys are grouped by the pack that holds them, so a gather over many shards' packs, asked in any
        order, reads about a vector's own bytes per vector instead of a whole pack per vector."""
        index = self._locations()
        by_pack: dict[tuple, list[str]] = {}
        for key in dict.fromkeys(keys):
            locs = index.get(key)
            if locs:
                by_pack.setdefault((locs[0][0], locs[0][1]), []).append(key)
        out = {}
        for (root, path), group in by_pack.items():
            whole: list[bytes] = []

            def read(r, p, root=root, path=path, whole=whole):
                if (r, p) != (root, path):  # a second copy elsewhere: its own pack, read as get reads it
                    return self._pack(r, p)
                if not whole:
                    whole.append(self._read_pack(root, path))
                return whole[0]

            for key in group:
                v = self._get(key, read)
                if v is not None:
                    out[key] = v
        return out

    def _get(self, key: str, read) -> np.ndarray | None:
        """``key``'s first trusted entry, its pack's bytes from ``read(root, pack)``."""
        damaged = False
        for root, path, offset, dim, check in self._locations().get(key, ()):
            try:
                body = read(root, path)[offset: offset + 2 * dim]
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
            tmp = folder / f".{name}.{process_token()}.tmp"
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
