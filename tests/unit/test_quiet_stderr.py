"""quiet_stderr across threads: LiteRT's lanes each silence fd 2 around their allocation, overlapping."""

from __future__ import annotations

import os
import threading

from mltag.tf_runtime import quiet_stderr


def _fd2() -> tuple[int, int]:
    st = os.fstat(2)
    return st.st_dev, st.st_ino


def test_overlapping_threads_give_fd_2_back_whoever_leaves_last():
    before = _fd2()
    null = os.stat(os.devnull)
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def first():
        with quiet_stderr():
            first_in.set()
            second_in.wait(10)
            seen.append(_fd2())
        first_out.set()

    def second():
        first_in.wait(10)
        with quiet_stderr():  # enters while the first is inside: it must not save the silenced fd as "the" stderr
            second_in.set()
            first_out.wait(10)
            seen.append(_fd2())

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == [(null.st_dev, null.st_ino)] * 2  # silenced inside, both times
    assert _fd2() == before  # and given back after the last one left (the first left first)
    with quiet_stderr():
        with quiet_stderr():  # nested in one thread too
            pass
        assert _fd2() == (null.st_dev, null.st_ino)
    assert _fd2() == before



def test_mltag_s_log_lines_follow_stderr_after_it_was_replaced():
    """The handler writes to stderr as it is when a line is logged: a capture or redirect closed since (a test's, a
    notebook's, the CLI's credential mask of an earlier command in this process) is neither written to nor in the way."""
    import contextlib
    import io
    import logging

    from mltag.logs import setup_logging

    logger = logging.getLogger("mltag")
    level = logger.level
    first = io.StringIO()
    try:
        with contextlib.redirect_stderr(first):
            setup_logging(logging.INFO)
            logging.getLogger("mltag.unit").info("one")
        first.close()
        second = io.StringIO()
        with contextlib.redirect_stderr(second):
            logging.getLogger("mltag.unit").info("two")
        assert second.getvalue() == "two\n"
    finally:
        logger.setLevel(level)
