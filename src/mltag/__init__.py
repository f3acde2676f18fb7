"""mltag: multi-label image classification by transfer learning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mltag")  # from git through setuptools-scm, when installed
except PackageNotFoundError:  # run from a source folder that was never installed
    __version__ = "0.0.0+unknown"
