"""The one lane scheduler (bottleneck and predict): input order, every lane busy, bounded, errors surface."""

from __future__ import annotations

import threading
import time

import pytest


def test_in_lanes_yields_in_input_order_whichever_lane_finishes_first():
    from mltag.inference.lanes import in_lanes

    seen = set()

    def slow(i):  # lane 0 is slow: later items finish first on lane 1
        seen.add(threading.current_thread().name)
        time.sleep(0.004 if i % 3 == 0 else 0.0005)
        return i

    lanes = [lambda x: slow(x), lambda x: slow(x)]
    out = list(in_lanes(iter(range(200)), lanes, lambda run, item: run(item) * 2))
    assert out == [2 * i for i in range(200)]
    assert seen == {"mltag-lane0", "mltag-lane1"}


def test_in_lanes_keeps_at_most_ahead_results_waiting_for_a_slow_caller():
    from mltag.inference.lanes import in_lanes

    started = []
    gen = in_lanes(iter(range(1000)), [lambda x: x] * 2, lambda run, item: started.append(item) or run(item), ahead=8)
    assert next(gen) == 0
    time.sleep(0.2)  # the caller is slow: the lanes must wait, not run through all 1000 items
    assert len(started) <= 1 + 8 + 2
    gen.close()


def test_a_lane_error_is_raised_in_the_caller_and_every_lane_stops():
    from mltag.inference.lanes import in_lanes

    def work(run, item):
        if item == 57:
            raise ValueError("bad item 57")
        return item

    with pytest.raises(ValueError, match="bad item 57"):
        list(in_lanes(iter(range(10_000)), [None, None, None], work))
    time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name.startswith("mltag-lane")]


def test_an_empty_input_yields_nothing():
    from mltag.inference.lanes import in_lanes

    assert list(in_lanes(iter([]), [None, None], lambda run, item: item)) == []


def test_imap_ordered_starts_its_window_at_the_call_and_keeps_order():
    """compute_missing loads the engine after the call: the first decodes must already be running."""
    import threading

    from mltag.workers import imap_ordered

    started = threading.Semaphore(0)

    def work(x):
        started.release()
        return x * x

    it = imap_ordered(work, range(10), workers=2, ahead=3)
    assert all(started.acquire(timeout=10) for _ in range(3))  # before any next()
    assert list(it) == [x * x for x in range(10)]

    def fails(x):
        if x == 4:
            raise ValueError("item 4")
        return x

    with pytest.raises(ValueError, match="item 4"):
        list(imap_ordered(fails, range(10), workers=2, ahead=3))
