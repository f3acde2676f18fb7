"""Which images a command was given: files, folders (recursive), globs and list files, in any mix."""

from __future__ import annotations

import glob
from pathlib import Path

from mltag.errors import MltagError


def expand_images(specs: list[str]) -> tuple[list[str], bool]:
    """Files, folders (recursive), globs and ``.txt``/``.lst`` list files -> image paths, in the order given.

    Returns the paths and whether a folder or glob was expanded (then a progress bar helps).
    A missing file stays in the list: its row says so.
    """
    from mltag.data.images import IMAGE_EXTENSIONS
    from mltag.files import read_user_text

    out, expanded = [], False
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            expanded = True
            out += [str(f) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                    and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        elif p.is_file() and p.suffix.lower() in (".txt", ".list"):
            expanded = True
            for line in read_user_text(p).splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    f = Path(line.strip())
                    out.append(str(f if f.is_absolute() else p.parent / f))
        elif not p.exists() and any(c in spec for c in "*?["):
            expanded = True
            found = sorted(glob.glob(spec, recursive=True))
            if not found:
                raise MltagError("no file matches this pattern", spec)
            out += found
        else:
            out.append(spec)
    if not out:
        raise MltagError("no images to predict (the folders given hold none)")
    return out, expanded
