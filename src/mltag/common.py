"""Shared pieces: errors, atomic writes, the canonical .lst/labels formats."""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence


class MltagError(Exception):
    """A user-facing error: printed as one clear line, never a traceback."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = None if path is None else str(path)
        self.line = line


# --------------------------------------------------------------------------- atomic writes


_PROCESS_START = time.time()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _leftover_pid(name: str, stem: str | None) -> int | None:
    """The PID in a leftover: ``.{stem}.{pid}[.<random>].tmp`` or ``.{stem}.old-{pid}``; else None.

    With ``stem`` None, any name of that shape matches.
    """
    st = re.escape(stem) if stem is not None else r".+?"
    m = re.fullmatch(rf"\.{st}\.(?:(\d+)(?:\.[^/]*)?\.tmp|old-(\d+))", name)
    return int(m.group(1) or m.group(2)) if m else None


def remove_stale_leftovers(folder: str | os.PathLike, stem: str | None = None) -> int:
    """Remove what killed runs left in ``folder``: temp files and folders, swapped-out old outputs.

    Only leftovers of ``stem`` (an output's name) when given, else any. A leftover is stale
    when the process that made it is gone and it is older than this process. Returns how
    many were removed.
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for e in entries:
        if not e.name.startswith("."):
            continue
        pid = _leftover_pid(e.name, stem)
        if pid is None or _pid_alive(pid):
            continue
        try:
            if e.stat(follow_symlinks=False).st_mtime >= _PROCESS_START:
                continue
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            removed += 1
        except OSError:
            continue
    if removed:
        logging.getLogger(__name__).info("removed %d leftover(s) of killed runs in %s", removed, folder)
    return removed


def lock_file_for(dest: str | os.PathLike) -> Path:
    """The lock file guarding ``dest``: outside it (never part of an output), one per absolute path."""
    key = hashlib.sha256(str(Path(dest).absolute()).encode()).hexdigest()[:24]
    folder = Path(tempfile.gettempdir()) / f"mltag-locks-{os.getuid() if hasattr(os, 'getuid') else 0}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.lock"


@contextlib.contextmanager
def locked(lock_path: str | os.PathLike, what: str, timeout: float = -1):
    """Hold an exclusive file lock; when another process holds it, say so once and wait.

    Yields whether it had to wait (another run held the lock, so what it guards may have changed).
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path))
    waited = False
    try:
        lock.acquire(timeout=0)
    except Timeout:  # (a TimeoutError, so before OSError)
        waited = True
        logging.getLogger(__name__).warning("waiting for another mltag run that is writing %s (lock %s)",
                                            what, lock_path)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise MltagError(f"another run still holds the lock after {timeout:.0f} s", lock_path) from None
    except OSError as e:  # read-only or missing folder
        raise MltagError(f"cannot create a lock file: {e.strerror or e}", lock_path) from None
    try:
        yield waited
    finally:
        lock.release()


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it into place only on success.

    Works for files and directories: a reader never sees a half-written ``dest``. The swap
    holds a lock per ``dest``, so two runs writing the same output one after the other
    leave one complete output, and it removes stale leftovers of killed runs.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent))
    except OSError as e:
        raise MltagError(f"cannot write here: {e.strerror or e}", dest.parent) from None
    target = tmp / dest.name
    try:
        try:
            yield target
            fault_point(f"write:{dest.name}")
        except OSError as e:
            # A failed write (full disk, quota, I/O error) carries no file name: name the output.
            if e.filename is None and e.errno in _WRITE_ERRNOS:
                raise MltagError(f"cannot write: {e.strerror or e} (free some space, or write elsewhere); "
                                 "the previous output is untouched", dest) from None
            raise
        with locked(lock_file_for(dest), str(dest)):
            if dest.is_dir() and not dest.is_symlink():
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
                os.replace(dest, old)
                os.replace(target, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(target, dest)
            remove_stale_leftovers(dest.parent, dest.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(dest: str | os.PathLike, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(dest: str | os.PathLike, obj) -> None:
    write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- threads and noise


def cpu_threads() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def imap_ordered(fn: Callable, items: Iterable, workers: int | None = None, ahead: int | None = None) -> Iterator:
    """``map(fn, items)`` on a thread pool, in order, at most ``ahead`` items in flight.

    For work that releases the GIL (Pillow decoding and resizing): the bounded window keeps
    memory flat however many items there are. The first ``ahead`` items are submitted at
    the call, so the caller's own set-up (loading an engine) overlaps them; ``close()``
    cancels what is queued and waits for what runs.
    """
    return _Ordered(fn, items, workers or cpu_threads(), ahead or 2 * (workers or cpu_threads()))


class _Ordered:
    """The iterator of ``imap_ordered``."""

    def __init__(self, fn: Callable, items: Iterable, workers: int, ahead: int):
        from concurrent.futures import ThreadPoolExecutor

        self._fn, self._it = fn, iter(items)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="mltag-pool")
        self._pending = collections.deque(self._pool.submit(fn, x) for x in itertools.islice(self._it, ahead))

    def __iter__(self):
        return self

    def __next__(self):
        if not self._pending:
            self.close()
            raise StopIteration
        fut = self._pending.popleft()
        for x in itertools.islice(self._it, 1):
            self._pending.append(self._pool.submit(self._fn, x))
        try:
            return fut.result()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __del__(self):  # abandoned half-way (an exception in the caller's loop): stop what is queued
        for fut in getattr(self, "_pending", ()):
            fut.cancel()
        if hasattr(self, "_pool"):
            self._pool.shutdown(wait=False)


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 for a moment: C++ libraries (TF, LiteRT) print there directly."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def import_tensorflow():
    """``import tensorflow`` once, with its C++ start-up lines (oneDNN, "could not find cuda drivers",
    cuInit) kept off the terminal: they print before any Python-side setting applies. ``-v`` shows them."""
    import sys

    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    if logging.getLogger("mltag").isEnabledFor(logging.DEBUG):
        import tensorflow

        return tensorflow
    with quiet_stderr():
        import tensorflow

        tensorflow.config.list_physical_devices("GPU")  # device discovery logs cuInit failures once, here
    return tensorflow


# --------------------------------------------------------------------------- fault injection


def fault_point(name: str) -> None:
    """Test hook for the fault-injection suite (tests/test_faults.py).

    ``MLTAG_FAULT=<name>`` kills this process with SIGKILL here; ``MLTAG_FAULT=<name>=sleep:S``
    sleeps S seconds here instead (to make two runs overlap); ``MLTAG_FAULT=<name>=enospc``
    raises the error a full disk gives a write (no file name). Unset, it costs one lookup.
    """
    spec = os.environ.get("MLTAG_FAULT")
    if not spec or not spec.startswith(name):
        return
    if spec == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    elif spec == f"{name}=enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif spec.startswith(f"{name}=sleep:"):
        time.sleep(float(spec.rsplit(":", 1)[1]))


# --------------------------------------------------------------------------- user text files


def read_user_text(path: str | os.PathLike) -> str:
    """A user's text file (labels, lists, CSV, JSON) as UTF-8, a leading byte-order mark removed.

    Excel's "CSV UTF-8" and Notepad write a BOM, which would otherwise end up in the
    first label or column name. Bytes that are not UTF-8 are an error naming the line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise MltagError(f"cannot read: {e.strerror or e}", path) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MltagError(f"not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8", path, line) from None


# --------------------------------------------------------------------------- labels and .lst


def read_labels(path: str | os.PathLike) -> list[str]:
    """Read label names from labels.txt (one per line) or labels.json (a list, or {"labels": [...]})."""
    path = Path(path)
    if not path.is_file():
        raise MltagError("label file not found", path)
    if path.suffix == ".json":
        try:
            data = json.loads(read_user_text(path))
        except json.JSONDecodeError as e:
            raise MltagError(f"invalid JSON: {e.msg}", path, e.lineno) from None
        if isinstance(data, dict):
            data = data.get("labels")
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise MltagError("expected a list of label names (or {\"labels\": [...]})", path)
        names = [x.strip() for x in data]
        lines = list(range(1, len(names) + 1))
    else:
        names, lines = [], []
        for i, raw in enumerate(read_user_text(path).splitlines(), 1):
            if raw.strip():
                names.append(raw.strip())
                lines.append(i)
    if not names:
        raise MltagError("no label names", path)
    seen: dict[str, int] = {}
    for name, line in zip(names, lines):
        if not name:
            raise MltagError("empty label name", path, line)
        if name in seen:
            raise MltagError(f"duplicate label {name!r} (first on line {seen[name]})", path, line)
        seen[name] = line
    return names


def write_labels(path: str | os.PathLike, labels: Sequence[str]) -> None:
    write_text_atomic(path, "".join(f"{x}\n" for x in labels))


@dataclass(frozen=True)
class Example:
    """One image and its 0/1 label flags."""

    path: str  # relative to the image root, '/'-separated
    flags: tuple[int, ...]
    source: str = ""  # "file:line" it came from, for messages


def read_lst(path: str | os.PathLike, n_labels: int | None = None) -> list[Example]:
    """Parse ``index<TAB>flag_1..flag_N<TAB>relative/path`` lines, validating each."""
    path = Path(path)
    if not path.is_file():
        raise MltagError("list file not found", path)
    out: list[Example] = []
    seen_idx: dict[str, int] = {}
    seen_path: dict[str, int] = {}
    for i, raw in enumerate(read_user_text(path).splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        cols = raw.rstrip("\r\n").split("\t")
        if len(cols) < 3:
            raise MltagError(
                f"expected index<TAB>flags...<TAB>path, got {len(cols)} tab-separated column(s)", path, i
            )
        idx, flags, rel = cols[0].strip(), cols[1:-1], cols[-1].strip()
        if n_labels is not None and len(flags) != n_labels:
            raise MltagError(f"expected {n_labels} label flags, got {len(flags)}", path, i)
        bad = [f for f in flags if f.strip() not in ("0", "1")]
        if bad:
            raise MltagError(f"label flags must be 0 or 1, got {bad[0]!r}", path, i)
        if idx in seen_idx:
            raise MltagError(f"duplicate index {idx!r} (first on line {seen_idx[idx]})", path, i)
        if rel in seen_path:
            raise MltagError(f"duplicate path {rel!r} (first on line {seen_path[rel]})", path, i)
        seen_idx[idx] = i
        seen_path[rel] = i
        out.append(Example(rel, tuple(int(f) for f in flags), f"{path}:{i}"))
    return out


def write_lst(path: str | os.PathLike, examples: Sequence[Example]) -> None:
    lines = [
        "\t".join([str(i), *(str(f) for f in ex.flags), ex.path]) + "\n" for i, ex in enumerate(examples)
    ]
    write_text_atomic(path, "".join(lines))


def find_labels_file(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    for name in ("labels.txt", "labels.json"):
        if (folder / name).is_file():
            return folder / name
    raise MltagError("no labels.txt or labels.json here", folder)
