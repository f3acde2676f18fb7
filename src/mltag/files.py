"""Writing outputs so that nothing is lost or half-written, locks, hashing files, reading a
user's text files, and the fault-injection hook the fault suite drives."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from mltag.errors import MltagError, TransientError

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


def _host_id() -> str:
    """This machine's boot, as 8 hex digits: the host name and the kernel's boot id. A PID means something
    only on the machine (and boot) that issued it; on a volume shared by pods on several nodes (a PVC), a
    leftover named by another node's PID must not be judged by this node's process table."""
    import hashlib
    import socket

    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return hashlib.sha256(f"{socket.gethostname()}|{boot}".encode()).hexdigest()[:8]


HOST_ID = _host_id()
FOREIGN_STALE_SECONDS = 24 * 3600  # another machine's leftover: removed only when untouched this long


def process_token() -> str:
    """What temp and swapped-out names carry: ``{pid}@{host id}``."""
    return f"{os.getpid()}@{HOST_ID}"


def _leftover_pid(name: str, stem: str | None) -> tuple[int, str | None] | None:
    """The PID (and host id, when named) in a leftover: ``.{stem}.{pid}[@{host}][.<random>].tmp`` or
    ``.{stem}.old-{pid}[@{host}]``; else None. With ``stem`` None, any name of that shape matches.
    """
    st = re.escape(stem) if stem is not None else r".+?"
    m = re.fullmatch(rf"\.{st}\.(?:(\d+)(?:@([0-9a-f]{{8}}))?(?:\.[^/]*)?\.tmp|old-(\d+)(?:@([0-9a-f]{{8}}))?)", name)
    if not m:
        return None
    return int(m.group(1) or m.group(3)), m.group(2) or m.group(4)


_CLEANED: set[tuple[str, str | None]] = set()


def remove_stale_leftovers(folder: str | os.PathLike, stem: str | None = None) -> int:
    """Remove what killed runs left in ``folder``: temp files and folders, swapped-out old outputs.

    Only leftovers of ``stem`` (an output's name) when given, else any. A leftover is stale
    when the process that made it is gone and it is older than this process; one made on another
    machine (a shared volume) when it has not been touched for ``FOREIGN_STALE_SECONDS``. Returns how
    many were removed.
    """
    removed = 0
    # What is stale is older than this process, so one look per folder (and output name) is enough: a
    # folder of 100,000 files written one by one would otherwise be listed 100,000 times.
    seen = (os.path.abspath(folder), stem)
    if seen in _CLEANED:
        return 0
    _CLEANED.add(seen)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for e in entries:
        if not e.name.startswith("."):
            continue
        found = _leftover_pid(e.name, stem)
        if found is None:
            continue
        pid, host = found
        foreign = host is not None and host != HOST_ID
        if not foreign and _pid_alive(pid):
            continue
        try:
            mtime = e.stat(follow_symlinks=False).st_mtime
            if mtime >= _PROCESS_START or (foreign and time.time() - mtime < FOREIGN_STALE_SECONDS):
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


def lock_beside(target: str | os.PathLike) -> Path:
    """The lock file guarding ``target`` in one of mltag's own caches (a built backbone, a LiteRT conversion, the
    feature memo, a downloaded model): ``<target>.lock`` beside it, so that processes on other machines that see
    the same volume (pods on a ReadWriteMany claim) exclude each other too; a lock in a pod's own temp folder
    guards nothing across pods."""
    lock = Path(f"{target}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    return lock


def lock_file_for(dest: str | os.PathLike) -> Path:
    """The lock file guarding an output ``dest`` while it is swapped in: outside it and outside the user's folders
    (never part of an output, no stray file beside data/prepared), one per absolute path. Outputs are written by
    one task each; the caches that processes share lock beside themselves (``lock_beside``)."""
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


# A folder holding one of these is an output mltag wrote (prepare, bottleneck, train, evaluate, review, a
# built backbone), which a new run may replace; any other folder is the user's and is never replaced.
OUTPUT_MARKERS = ("dataset.json", "bottleneck.json", "model.json", "scores.npz", "label_issues.csv", "saved_model.pb",
                  "drift.json")


def replaceable(dest: str | os.PathLike, also: tuple[str, ...] = ()) -> Path:
    """The path an output is written to: ``dest``, or the file a symlink points to (written through).

    Refused with the reason, before any work: a device, pipe or socket; a folder that is not empty and
    holds no mltag output (``OUTPUT_MARKERS``, or only entries matching the ``also`` patterns), such as a
    dataset given as ``--out``. A file output over a folder (or the reverse) is refused at the swap.
    """
    import stat

    dest = Path(dest)
    if dest.is_symlink():
        dest = Path(os.path.realpath(dest))
    try:
        mode = dest.stat().st_mode
    except OSError:  # not there (or not reachable): the write itself says what is wrong, in the step's words
        return dest
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
            "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file"
        raise MltagError(f"is {kind}: an output must be a file or a folder path (nothing was written)", dest)
    if stat.S_ISDIR(mode):
        entries = [e.name for e in os.scandir(dest)]
        ours = any(m in entries for m in OUTPUT_MARKERS) or (
            also and all(any(fnmatch.fnmatch(e, pat) for pat in also) for e in entries))
        if entries and not ours:
            shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
            raise MltagError(f"is a folder that mltag did not write ({len(entries)} entries: {shown}); an output "
                             "replaces its path whole, so give a new or empty folder (nothing was touched)", dest)
    return dest


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM wait until the block is done, then act as they would have.

    An MLflow call holds SQLAlchemy's connection pool and the store's locks; an interrupt raised inside it could
    leave one held, and the step's own FAILED/KILLED end of its run would then wait on it forever. A folder
    swap (``atomic_path``) is two renames: an interrupt between them would leave only the old copy aside. So a signal
    that arrives during the call is remembered and delivered right after it; a second one acts at once (a server
    that hangs the call). Outside the main thread (where Python runs signal handlers) nothing changes.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, object]] = []
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def remember(signum, frame):
        if pending:  # a second one: the user means it (a server that hangs the call), act now
            for sig, handler in old.items():
                signal.signal(sig, handler)
            _deliver(old[signum], signum, frame)
        pending.append((signum, frame))

    for sig in old:
        signal.signal(sig, remember)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for signum, frame in pending[:1]:  # the first one, as its own handler would have met it
            _deliver(old[signum], signum, frame)


def _deliver(handler, signum: int, frame) -> None:
    """What ``handler`` (a signal's handler as ``signal.getsignal`` gave it) does with ``signum``."""
    import signal

    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, also: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it into place only on success.

    Works for files and directories: a reader never sees a half-written ``dest``. The swap
    holds a lock per ``dest``, so two runs writing the same output one after the other
    leave one complete output, and it removes stale leftovers of killed runs. What ``dest`` may
    replace is ``replaceable``'s rule: never the user's folder, a device or a pipe.
    """
    dest = replaceable(dest, also)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{process_token()}.", suffix=".tmp", dir=dest.parent))
    except OSError as e:
        raise MltagError(f"cannot write here: {e.strerror or e}", dest.parent) from None
    target, old = tmp / dest.name, None
    try:
        try:
            yield target
            fault_point(f"write:{dest.name}")
        except OSError as e:
            # A failed write (full disk, quota, I/O error) carries no file name: name the output.
            if e.filename is None and e.errno in _WRITE_ERRNOS:
                raise TransientError(f"cannot write: {e.strerror or e} (free some space, or write elsewhere); "
                                     "the previous output is untouched", dest) from None
            raise
        with locked(lock_file_for(dest), str(dest)):
            if dest.is_dir() != target.is_dir() and dest.exists():
                kind = "a folder" if dest.is_dir() else "a file"
                raise MltagError(f"is {kind}, and this output is {'a folder' if target.is_dir() else 'a file'}: "
                                 "give another path (nothing was replaced)", dest)
            try:
                if dest.is_dir() and not dest.is_symlink():
                    old = dest.with_name(f".{dest.name}.old-{process_token()}")
                    with signals_deferred():  # Ctrl-C or SIGTERM after both renames, never between them
                        os.replace(dest, old)
                        try:
                            os.replace(target, dest)
                        except BaseException:
                            os.replace(old, dest)  # the previous output back in place
                            raise
                else:
                    os.replace(target, dest)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # another process (a second pod on a shared volume: the lock above is this machine's) put its own
                # complete output there between the check and the rename
                raise MltagError("another run wrote this output at the same moment (a second process or pod on the "
                                 "same folder); its complete output is in place and this one was not moved there: "
                                 "rerun this step if it should be this run's", dest) from None
            remove_stale_leftovers(dest.parent, dest.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and dest.is_dir():  # also when a deferred signal ends the process right after the swap
            shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(dest: str | os.PathLike, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomic(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(dest: str | os.PathLike, obj) -> None:
    write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def json_default(o):
    """``json.dumps``' ``default``: numpy scalars and arrays, and paths, as plain JSON values."""
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


def fault_point(name: str) -> None:
    """Test hook for the fault-injection suite (tests/e2e/test_faults.py).

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


def csv_rows(reader, width: int, path: str | os.PathLike, errors: RowErrors | None = None):
    """``(line, row)`` for each non-blank row of a ``csv.reader`` over a user's file; a row of another
    width than ``width`` is an error naming the file and line (kept in ``errors`` and skipped, when given)."""
    for row in reader:
        line = reader.line_num
        if not any(x.strip() for x in row):
            continue
        if len(row) != width:
            e = MltagError(f"expected {width} columns, got {len(row)}", path, line)
            if errors is None:
                raise e
            errors.errors.append(e)
            continue
        yield line, row


class RowErrors:
    """The broken rows of one user file, gathered so that a file with many is reported whole in one run (the first
    ``LIMIT``, then how many more), not one row per run."""

    LIMIT = 20

    def __init__(self, path: str | os.PathLike):
        self.path, self.errors = path, []

    @contextlib.contextmanager
    def row(self):
        """A row's checks: an error naming a line is kept, and the next row is read."""
        try:
            yield
        except MltagError as e:
            if e.line is None:
                raise
            self.errors.append(e)

    def check(self) -> None:
        """One error for every kept row (a single one as it was raised)."""
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            shown = "".join(f"\n  line {e.line}: {e.message}" for e in self.errors[: self.LIMIT])
            more = f"\n  ... and {len(self.errors) - self.LIMIT} more" if len(self.errors) > self.LIMIT else ""
            raise MltagError(f"{len(self.errors)} broken rows; fix them all, then rerun:{shown}{more}", self.path)
