"""The one image every Kubeflow step runs in.

Set ``MLTAG_IMAGE`` when compiling to use your registry; the default is derived from
the package version, so a release and its image move together.
"""

import os

from mltag import __version__

DEFAULT_REGISTRY = "ghcr.io/mltag/mltag"
IMAGE = os.environ.get("MLTAG_IMAGE") or f"{DEFAULT_REGISTRY}:{__version__}"
