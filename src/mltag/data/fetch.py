"""Where a dataset is, and which version of it: a DVC-versioned repo at a revision, a bucket, a path.

``resolve_version`` turns a mutable reference (a branch, a bucket prefix, a folder) into
an immutable one before anything is cached on it; ``fetch_dataset`` copies a remote
dataset (a DVC repo at that commit, a bucket) to a local folder once, for prepare, and
``ImageSource`` downloads just the images a later step reads. A local or mounted folder
is read in place.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from mltag.errors import MltagError


def fetch_dataset(data: str, repo: str = "", rev: str = "", dest: str | os.PathLike = "source") -> Path:
    """Copy a remote dataset into ``dest`` and return the input path for prepare there.

    Args:
        data: a path inside ``repo`` when a repo is given; else an fsspec URI (``s3://``,
            ``gs://``... with the matching fsspec package installed). A local or mounted
            folder is never copied: it is read in place.
        repo: git URL (or local path) of a DVC project holding the dataset; empty for none.
        rev: the commit of ``repo`` to read (``resolve_version`` gives it); empty: the default branch.
    """
    dest = Path(dest)
    check_git_value(repo, "data repo")
    check_git_value(rev, "data revision")
    if dest.exists():
        shutil.rmtree(dest)
    if repo:
        from dvc.repo import Repo

        try:
            Repo.get(repo, data, out=str(dest), rev=rev or None)
        except Exception as e:  # noqa: BLE001 - dvc raises many kinds
            raise MltagError(f"cannot get {data!r} from DVC repo {repo} at {rev or 'HEAD'}: {e}") from None
        return dest
    if not is_remote(data):
        raise MltagError(f"{data} is a local path: read it in place, there is nothing to fetch")
    import fsspec

    fs, path = fsspec.core.url_to_fs(data)
    if not fs.exists(path):
        raise MltagError(f"dataset not found: {data}")
    fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
    return dest


def git_rev(path: str) -> str | None:
    """The git commit of the dataset folder's repository, when there is one."""
    import subprocess

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    try:
        rev = subprocess.run(["git", "-C", str(folder.absolute()), "rev-parse", "--verify", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return rev.stdout.strip() or None if rev.returncode == 0 else None


def dataset_version_of(path: str) -> str:
    """The local dataset's own version, for lineage (never the project's commit, which need not hold the data):

    * under a folder that DVC tracks (``photos.dvc`` beside ``photos/``): ``dvc:<folder>.dvc@<its md5>``, the
      version ``dvc add`` recorded;
    * else in a git repository with no change to the folder: ``git:<commit>``, the commit that holds it as it is;
    * else ``untracked (<resolve_version's manifest>)``: said plainly, with a hash of the folder's file names,
      sizes and times so that two runs can still be told apart.
    """
    import subprocess

    import yaml

    p = Path(path).absolute()
    folder = p if p.is_dir() else p.parent
    for d in (folder, *folder.parents):
        dvc_file = d.parent / f"{d.name}.dvc"
        if d.name and dvc_file.is_file():
            try:
                md5 = (yaml.safe_load(dvc_file.read_text(encoding="utf-8"))["outs"][0]).get("md5")
            except (OSError, ValueError, yaml.YAMLError, KeyError, IndexError, TypeError, AttributeError):
                md5 = None
            if md5:
                return f"dvc:{dvc_file.name}@{md5}"
    rev = git_rev(str(folder))
    if rev:
        try:
            changed = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--", "."],
                                     capture_output=True, text=True, timeout=30)
            tracked = subprocess.run(["git", "-C", str(folder), "ls-files", "--", "."], capture_output=True,
                                     text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            changed = tracked = None
        if changed is not None and changed.returncode == 0 and not changed.stdout.strip() and tracked.stdout.strip():
            return f"git:{rev}"
    return f"untracked ({resolve_version(str(p)).rpartition('#')[2]})"


def is_remote(data: str) -> bool:
    return "://" in data and not data.startswith("file://")


def resolve_version(data: str, repo: str = "", rev: str = "") -> str:
    """An immutable name for the dataset as it is now, for caching and lineage.

    * a DVC repo: ``<repo>@<commit>``, the commit ``rev`` (a branch, tag or commit; empty
      for the default branch) points at now;
    * an fsspec URI: ``<uri>#manifest-<hash>`` over every object's name, size and ETag
      (or checksum, or modification time);
    * a local or mounted folder (or a labels file in it): ``<path>#manifest-<hash>`` over
      every file's relative path, size and modification time.

    A moved branch or a changed bucket gives a new name, so a step cached on it runs again.
    """
    if repo:
        return f"{repo}@{_commit_of(repo, rev)}"
    if is_remote(data):
        import fsspec

        fs, path = fsspec.core.url_to_fs(data)
        if not fs.exists(path):
            raise MltagError(f"dataset not found: {data}")
        found = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
        rows = sorted(f"{name}\t{info.get('size')}\t{_object_version(info)}" for name, info in found.items())
        return f"{data}#manifest-{_digest(rows)}"
    src = Path(data.removeprefix("file://"))
    if not src.exists():
        raise MltagError("dataset not found", src)
    folder = src if src.is_dir() else src.parent
    rows = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            f = Path(dirpath) / name
            st = f.stat()
            rows.append(f"{f.relative_to(folder).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}")
    return f"{data}#manifest-{_digest(sorted(rows))}"


def _digest(rows: list[str]) -> str:
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def _object_version(info: dict) -> str:
    for k in ("ETag", "etag", "md5Hash", "crc32c", "generation", "VersionId", "mtime", "LastModified", "created"):
        if info.get(k) is not None:
            return str(info[k])
    return ""


def check_git_value(value: str, what: str) -> None:
    """Refuse a user value that git (or DVC's git) could read as an option: ``--upload-pack=...``."""
    if value.startswith("-"):
        raise MltagError(f"{what} {value!r} starts with '-', which git would read as an option; give a URL, a "
                         f"path (./{value} for a folder of that name) or a revision name")


def _commit_of(repo: str, rev: str) -> str:
    """The commit ``rev`` names in ``repo`` now (``git ls-remote``; a full commit id is already one)."""
    check_git_value(repo, "data repo")
    check_git_value(rev, "data revision")
    if re.fullmatch(r"[0-9a-f]{40}", rev):
        return rev
    try:
        patterns = [rev, f"{rev}^{{}}"] if rev else ["HEAD"]  # ^{}: the commit an annotated tag points at
        # '--': whatever the user gave is a repository and patterns, never an option of git's
        p = subprocess.run(["git", "ls-remote", "--", repo, *patterns], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MltagError(f"cannot reach data repo {repo}: {e}") from None
    if p.returncode != 0:
        raise MltagError(f"cannot read data repo {repo}: {p.stderr.strip()[:300]}")
    lines = [ln.split("\t") for ln in p.stdout.splitlines() if "\t" in ln]
    for want in (rev or "HEAD", f"refs/heads/{rev}", f"refs/tags/{rev}^{{}}", f"refs/tags/{rev}"):
        for sha, ref in lines:
            if ref == want:
                return sha
    raise MltagError(f"revision {rev!r} not found in data repo {repo} (give a branch, a tag or a full commit id)")


class ImageSource:
    """A dataset's images read by reference: from a bucket (fsspec URI) or a DVC repo at a commit.

    ``localize`` downloads just the named images into a local scratch folder (skipping
    those already there) and returns that folder, so each step moves only what it reads.
    """

    def __init__(self, root: str, repo: str = "", rev: str = "", scratch: str | os.PathLike | None = None):
        """``rev``: the repo's commit, or for a bucket the resolved version (its manifest hash), which
        keys the scratch folder so a changed bucket never reuses an older download."""
        check_git_value(repo, "data repo")
        check_git_value(rev, "data revision")
        self.root, self.repo, self.rev = root.rstrip("/"), repo, rev
        key = hashlib.sha256(f"{repo}@{rev}:{root}".encode()).hexdigest()[:16]
        self.scratch = Path(scratch or Path(os.environ.get("TMPDIR", "/tmp")) / "mltag-images" / key)

    def __repr__(self) -> str:
        return f"{self.repo}@{self.rev}:{self.root}" if self.repo else self.root

    def _fs(self):
        if self.repo:
            from dvc.api import DVCFileSystem

            return DVCFileSystem(self.repo, rev=self.rev or None), self.root
        import fsspec

        return fsspec.core.url_to_fs(self.root)

    def localize(self, rel_paths) -> Path:
        """Download the images at ``rel_paths`` (relative to the image root) that are not here yet."""
        from concurrent.futures import ThreadPoolExecutor

        self.scratch.mkdir(parents=True, exist_ok=True)
        todo = sorted({r for r in rel_paths if not (self.scratch / r).is_file()})
        if not todo:
            return self.scratch
        fs, base = self._fs()

        def get(rel: str) -> None:
            dest = self.scratch / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
            try:
                fs.get_file(f"{base}/{rel}" if base else rel, str(part))
            except FileNotFoundError:
                raise MltagError(f"image {rel} not found in {self!r}") from None
            os.replace(part, dest)  # whole files only: a killed download is fetched again

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(get, todo))
        return self.scratch
