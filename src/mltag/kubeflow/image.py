"""The one image every Kubeflow step runs in, tagged so that it changes whenever the code does.

KFP's cache key includes the image: a tag that stayed the same across code changes (the
package version alone) would let a cluster reuse results computed by older code. The tag is
the package version (from git, through setuptools-scm) plus a short digest of mltag's own
source files, e.g. ``ghcr.io/mltag/mltag:0.2.dev3-gab12cd3-src4f0e9a1b2c3d``. Set
``MLTAG_IMAGE`` when compiling to use another image (your registry's, built from that commit).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

from mltag import __version__

DEFAULT_REGISTRY = "ghcr.io/mltag/mltag"
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def source_digest(package_dir: Path = PACKAGE_DIR) -> str:
    """SHA-256 over mltag's source files (``.py`` and templates), names and bytes; 12 hex digits."""
    h = hashlib.sha256()
    for f in sorted(package_dir.rglob("*")):
        if f.is_file() and f.suffix in (".py", ".j2") and "__pycache__" not in f.parts:
            h.update(f"{f.relative_to(package_dir).as_posix()}\n".encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def image_tag(version: str = __version__, package_dir: Path = PACKAGE_DIR) -> str:
    """A Docker tag: the version ('+' and other characters a tag cannot hold become '-') and the source digest."""
    v = re.sub(r"[^A-Za-z0-9_.-]", "-", version)
    return f"{v}-src{source_digest(package_dir)}"[:128]


def default_image() -> str:
    return os.environ.get("MLTAG_IMAGE") or f"{DEFAULT_REGISTRY}:{image_tag()}"


def dirty_files(package_dir: Path = PACKAGE_DIR) -> list[str] | None:
    """mltag's source files with uncommitted changes, or None when the package is not in a git checkout."""
    try:
        inside = subprocess.run(["git", "-C", str(package_dir), "rev-parse", "--is-inside-work-tree"],
                                capture_output=True, text=True, timeout=20)
        if inside.returncode != 0 or inside.stdout.strip() != "true":
            return None
        p = subprocess.run(["git", "-C", str(package_dir), "status", "--porcelain", "--untracked-files=all", "--",
                            "."], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    files = [ln[3:] for ln in p.stdout.splitlines() if ln.strip()]
    return [f for f in files if f.endswith((".py", ".j2"))]


def check_clean_source(allow_dirty: bool = False, package_dir: Path = PACKAGE_DIR) -> None:
    """Refuse to compile from source that no commit holds (its image could never be rebuilt)."""
    from mltag.errors import MltagError

    if allow_dirty or os.environ.get("MLTAG_IMAGE"):
        return
    dirty = dirty_files(package_dir)
    if dirty:
        raise MltagError(f"mltag's source has uncommitted changes ({', '.join(dirty[:3])}"
                         f"{', ...' if len(dirty) > 3 else ''}): the image tag names the source, so commit first, "
                         "or pass --allow-dirty for a pipeline you will not run on a cluster", package_dir)


IMAGE = default_image()
