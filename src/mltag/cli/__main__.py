"""``python -m mltag.cli``: the plain exit (profilers write their data after it)."""

import sys

from mltag.cli import main, on_sigterm

on_sigterm()
sys.exit(main())
