"""How mltag logs: its own messages as plain lines on stderr (the CLI and its helper processes)."""

import logging


def setup_logging(level: int) -> None:
    """mltag's own messages go to stderr as plain lines; other libraries keep their defaults."""
    logger = logging.getLogger("mltag")
    if not any(getattr(h, "_mltag", False) for h in logger.handlers):
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        h._mltag = True
        logger.addHandler(h)
    logger.setLevel(level)
    logger.propagate = False
    if level > logging.DEBUG:  # MLflow's own INFO lines (database setup, signature checks): -v shows them
        logging.getLogger("mlflow").setLevel(logging.WARNING)
