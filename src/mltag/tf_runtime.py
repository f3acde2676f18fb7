"""Importing TensorFlow quietly: its C++ start-up lines go to file descriptor 2 before any
Python-side setting applies. Only the modules that run TF import this."""

from __future__ import annotations

import contextlib
import logging
import os
import threading

_quiet = {"lock": threading.Lock(), "depth": 0, "saved": None}


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 for a moment: C++ libraries (TF, LiteRT) print there directly.

    Safe across threads (LiteRT's lanes each allocate under it): the first to enter saves and silences fd 2,
    the last to leave puts it back. (Each saving its own copy let a thread save the silenced one and restore
    it last, which silenced mltag's own log lines for the rest of the process.)"""
    with _quiet["lock"]:
        if _quiet["depth"] == 0:
            try:
                saved = os.dup(2)
                with open(os.devnull, "wb") as null:
                    os.dup2(null.fileno(), 2)
                _quiet["saved"] = saved
            except OSError:
                _quiet["saved"] = None
        _quiet["depth"] += 1
    try:
        yield
    finally:
        with _quiet["lock"]:
            _quiet["depth"] -= 1
            if _quiet["depth"] == 0 and _quiet["saved"] is not None:
                os.dup2(_quiet["saved"], 2)
                os.close(_quiet["saved"])
                _quiet["saved"] = None


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
