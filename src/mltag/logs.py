"""How mltag logs: its own messages as plain lines on stderr."""

import logging
import sys


class _Stderr(logging.StreamHandler):
    """A handler on ``sys.stderr`` as it is when a line is logged: a later redirect (the CLI's credential mask, a
    notebook's or a test's capture) is followed, and a closed stream that was replaced is never written to."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int) -> None:
    """mltag's own messages go to stderr as plain lines; other libraries keep their defaults."""
    logger = logging.getLogger("mltag")
    if not any(getattr(h, "_mltag", False) for h in logger.handlers):
        h = _Stderr()
        h.setFormatter(logging.Formatter("%(message)s"))
        h._mltag = True
        logger.addHandler(h)
    logger.setLevel(level)
    logger.propagate = False
    if level > logging.DEBUG:  # MLflow's own INFO lines (database setup, signature checks): -v shows them
        logging.getLogger("mlflow").setLevel(logging.WARNING)
