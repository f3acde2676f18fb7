"""The thread pool every step uses for work that releases the GIL (decoding, resizing, hashing)."""

from __future__ import annotations

import collections
import itertools
import os
from typing import Callable, Iterable, Iterator


def die_with_parent(parent: int) -> None:
    """In a child process: be killed when ``parent`` ends, however it ends (kill -9, OOM), so no helper or
    forked worker outlives the step that started it (Linux ``PR_SET_PDEATHSIG``; elsewhere nothing).

    Ctrl-C reaches the whole foreground process group; the step answers it with one line and ends, and its
    children end with it. So a child ignores SIGINT, instead of printing a ``KeyboardInterrupt`` traceback of
    its own after the step's clean line."""
    import ctypes
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it ended before the line above
        os.kill(os.getpid(), signal.SIGKILL)


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
