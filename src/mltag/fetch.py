"""Bring a dataset to a local folder: a DVC-versioned repo at a revision, or a path/URI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mltag.common import MltagError


def fetch_dataset(data: str, repo: str = "", rev: str = "", dest: str | os.PathLike = "source") -> tuple[Path, str | None]:
    """Copy ``data`` into ``dest`` and return ``(input path for prepare, dataset version)``.

    Args:
        data: a path inside ``repo`` when a repo is given; else a local path or an fsspec URI
            (``s3://``, ``gs://``... with the matching fsspec package installed).
        repo: git URL (or local path) of a DVC project holding the dataset; empty for none.
        rev: git revision of ``repo``; empty means its default branch.

    The version is ``<repo>@<commit>`` for a DVC repo (the exact commit, even when
    ``rev`` is a branch), the git commit of a local folder inside a repo, or None.
    """
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    if repo:
        from dvc.repo import Repo

        try:
            Repo.get(repo, data, out=str(dest), rev=rev or None)
        except Exception as e:  # noqa: BLE001 - dvc raises many kinds
            raise MltagError(f"cannot get {data!r} from DVC repo {repo} at {rev or 'HEAD'}: {e}") from None
        commit = None
        try:
            with Repo.open(repo, rev=rev or None) as r:
                commit = r.scm.resolve_rev(rev) if rev else r.scm.get_rev()
        except Exception:  # noqa: BLE001 - the data is here; the exact commit is a nicety
            commit = rev or None
        return dest, f"{repo}@{commit}" if commit else repo
    if "://" in data and not data.startswith("file://"):
        import fsspec

        fs, path = fsspec.core.url_to_fs(data)
        if not fs.exists(path):
            raise MltagError(f"dataset not found: {data}")
        fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
        return dest, data
    src = Path(data.removeprefix("file://"))
    if not src.exists():
        raise MltagError("dataset not found", src)
    if src.is_dir():
        shutil.copytree(src, dest)
        return dest, git_rev(str(src))
    # A labels file (.lst, .csv...): its folder holds the images it names.
    shutil.copytree(src.parent, dest)
    return dest / src.name, git_rev(str(src))


def git_rev(path: str) -> str | None:
    """The git commit of the dataset folder's repository, when there is one."""
    import subprocess

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    try:
        rev = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return rev.stdout.strip() or None if rev.returncode == 0 else None
