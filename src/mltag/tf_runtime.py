"""Importing TensorFlow quietly: its C++ start-up lines go to file descriptor 2 before any
Python-side setting applies. Only the modules that run TF import this."""

from __future__ import annotations

import contextlib
import logging
import os


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
