"""Kept for versions registered before mltag's modules moved into subpackages: their
``pyfunc_model.py`` imports ``mltag.pyfunc``. New versions use ``mltag.registry.pyfunc``."""

from mltag.registry.pyfunc import MltagPyfunc  # noqa: F401
