"""The helper process of ``mltag.tracking.runs.Tracker``: runs a step's MLflow calls, in order.

Started as ``python -m mltag.tracking.helper REPLY_FD LOG_LEVEL``, the tracking URI in the environment
(``MLTAG_HELPER_TRACKING_URI``: it may hold a password, and argv is public). Dies with the step that
started it (``PR_SET_PDEATHSIG``), so a step that fails at once or is killed leaves no helper. Reads pickled ``(op, args,
kwargs)`` from stdin, writes a pickled reply per call to ``REPLY_FD`` (stdout and stderr stay
the step's). Stops at end of input, or before a call once the step that started it is gone,
and leaves with ``os._exit``: MLflow's exit hook would end an active run as FINISHED, and a
run left active here belongs to a step that died.
"""

from __future__ import annotations

import os
import pickle
import sys


def serve(reply_fd: int, level: int, uri: str) -> None:
    import logging

    from mltag.logs import setup_logging

    setup_logging(level)
    # What every step's first call needs, imported before it comes: MLflow, and for a database
    # store its SQLAlchemy store (together about 2 s, while the step starts and works).
    import mlflow  # noqa: F401

    if uri.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql"):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    parent = os.getppid()
    replies = os.fdopen(reply_fd, "wb")
    from mltag.errors import MltagError
    from mltag.tracking import runs as tracking

    commands = sys.stdin.buffer
    while True:
        try:
            op, args, kwargs = pickle.load(commands)
        except Exception:  # noqa: BLE001 - EOF, or a message cut off by the step's death: nothing more to do
            break
        if os.getppid() != parent:
            break  # the step died: nothing more in its name
        try:
            reply = ("ok", tracking.OPS[op](*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the step
            if isinstance(e, MltagError):
                reply = ("error", "mltag", type(e).__name__, str(e), e.path, e.line)
            else:
                from mlflow.exceptions import MlflowException

                logging.getLogger("mltag").debug("tracking helper: %s failed", op, exc_info=True)
                kind = "mlflow" if isinstance(e, MlflowException) else "other"
                reply = ("error", kind, type(e).__name__, str(e), None, None)
        try:
            pickle.dump(reply, replies)
            replies.flush()
        except BrokenPipeError:
            break


if __name__ == "__main__":
    from mltag.workers import die_with_parent

    die_with_parent(int(os.environ.get("MLTAG_HELPER_PARENT", os.getppid())))
    try:
        serve(int(sys.argv[1]), int(sys.argv[2]), os.environ.pop("MLTAG_HELPER_TRACKING_URI", ""))
    finally:
        # Never through the interpreter's exit: MLflow's atexit hook would end a run the step left open as
        # FINISHED, where the step's own end (KILLED, FAILED) or none at all is the truth.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing left to say
                pass
        os._exit(0)
