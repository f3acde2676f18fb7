"""The dataset formats a user brings (read by prepare, and by ``review apply``): each input format in, a ``Dataset`` (label names + examples) out.

Accepted inputs (auto-detected where unambiguous, ``fmt`` overrides):

* ``lst``: ``index<TAB>flags...<TAB>relative/path`` lines + labels.txt / labels.json;
* ``labels_json``: labels.json holding one ``[1, -1, ...]`` vector per image, images
  named by 1-based index (``1.jpg``...), label order from labels.txt (or the JSON's
  ``"labels"`` key);
* ``image_list``: ``image_list`` (``file count``) + ``image_label`` (0/1 matrix), line for line;
* ``folders``: one folder per class (single-label data);
* ``csv``: ``path,labels`` with space-separated label names.

Every error names the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from mltag import config
from mltag.data.formats import Example, check_label_name, read_labels, read_lst
from mltag.data.images import IMAGE_EXTENSIONS
from mltag.errors import MltagError
from mltag.files import RowErrors, csv_rows, read_user_text

FORMATS = tuple(f for f in config.choices("prepare", "format") if f != "auto")  # declared in mltag.config


def _not_reviewed(files) -> list[Path]:
    """A folder's label files without the corrected copies ``mltag review apply`` writes beside them
    (``*.reviewed.lst``, ``*.reviewed.csv``, ``reviewed.csv``): the original reads as before."""
    return sorted(f for f in files if not (f.stem.endswith(".reviewed") or f.stem == "reviewed"))


@dataclass
class Dataset:
    """Parsed input before image checks: label names, examples, and where images live."""

    labels: list[str]
    examples: list[Example]
    image_root: Path
    fmt: str
    rejected: list[dict] = field(default_factory=list)


def _check_rel(rel: str, root: Path, source: str) -> str:
    """Normalise a relative image path; refuse absolute paths and ones escaping the root."""
    path, _, line = source.rpartition(":")
    if any(c in rel for c in "\t\n\r"):  # the prepared .lst is tab- and line-separated
        raise MltagError(f"image path {rel!r} holds a tab or a line break; rename the file", path, int(line))
    rel = rel.strip().replace("\\", "/")
    if not rel:
        raise MltagError("empty image path", path, int(line))
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("~") or (len(rel) > 1 and rel[1] == ":"):
        raise MltagError(f"absolute image path {rel!r} is not allowed; paths are relative to {root}", path, int(line))
    parts: list[str] = []
    for x in p.parts:  # '..' is resolved by name: images/../images/x.jpg is images/x.jpg
        if x == "..":
            if not parts:
                raise MltagError(f"image path {rel!r} leads outside the image root {root}: its '..' climbs above "
                                 "the folder the paths are relative to; give paths inside it", path, int(line))
            parts.pop()
        elif x not in ("", "."):
            parts.append(x)
    if not parts:
        raise MltagError(f"image path {rel!r} names the image root itself, not an image", path, int(line))
    return "/".join(parts)


def _labels_near(folder: Path) -> list[str]:
    for name in ("labels.txt", "labels.json", "classes.txt"):
        f = folder / name
        if f.is_file():
            if name == "labels.json" and _json_kind(f) != "names":
                continue
            return read_labels(f)
    raise MltagError("no label names found (labels.txt, or labels.json with a list of names)", folder)


def _json_kind(path: Path) -> str:
    try:
        data = json.loads(read_user_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "invalid"
    if isinstance(data, dict):
        if "vectors" in data or "images" in data:
            return "vectors"
        if data and all(isinstance(v, list) and v and not isinstance(v[0], str) for v in data.values()):
            return "vectors"
        data = data.get("labels")
    if isinstance(data, list) and data and all(isinstance(x, str) for x in data):
        return "names"
    if isinstance(data, list) and data and all(isinstance(x, list) for x in data):
        return "vectors"
    return "unknown"


def read_lst_dataset(src: Path) -> Dataset:
    files = [src] if src.is_file() else _not_reviewed(src.glob("*.lst"))
    if not files:
        raise MltagError("no .lst file found", src)
    root = files[0].parent
    labels = _labels_near(root)
    examples, seen = [], {}
    for f in files:
        for ex in read_lst(f, n_labels=len(labels)):
            rel = _check_rel(ex.path, root, ex.source)
            if rel in seen:
                path, _, line = ex.source.rpartition(":")
                raise MltagError(f"duplicate path {rel!r} (first at {seen[rel]})", path, int(line))
            seen[rel] = ex.source
            examples.append(Example(rel, ex.flags, ex.source))
    return Dataset(labels, examples, root, "lst")


def _find_indexed_image(root: Path, index: int) -> str:
    for folder in ("", "images/"):
        for ext in IMAGE_EXTENSIONS:
            if (root / f"{folder}{index}{ext}").is_file():
                return f"{folder}{index}{ext}"
    return f"{index}.jpg"  # reported as a missing file by the image checks


def read_labels_json_dataset(src: Path) -> Dataset:
    jf = src if src.is_file() else src / "labels.json"
    root = jf.parent
    try:
        data = json.loads(read_user_text(jf))
    except FileNotFoundError:
        raise MltagError("file not found", jf) from None
    except json.JSONDecodeError as e:
        raise MltagError(f"invalid JSON: {e.msg}", jf, e.lineno) from None
    names = None
    if isinstance(data, dict):
        given = data.get("labels")
        if isinstance(given, list) and given and all(isinstance(x, str) for x in given):
            names = given
        if "vectors" in data or "images" in data:
            data = data.get("vectors", data.get("images"))
        elif names is not None:
            raise MltagError('with a "labels" key, put the label vectors under "vectors"', jf)
        # else: the dict itself maps image index -> vector
    if names is None:
        for name in ("labels.txt", "classes.txt"):
            if (root / name).is_file():
                names = read_labels(root / name)
                break
    if names is None:
        raise MltagError("label order unknown: add labels.txt beside labels.json or a \"labels\" key", jf)
    if isinstance(data, dict):
        items = sorted(data.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)
    elif isinstance(data, list):
        items = [(str(i + 1), v) for i, v in enumerate(data)]
    else:
        raise MltagError("expected a list of label vectors", jf)
    lines = _json_vector_lines(jf, len(items))
    examples = []
    for n, (key, vec) in enumerate(items):
        line = lines[n]
        if not str(key).isdigit():
            raise MltagError(f"image key {key!r} is not an index", jf, line)
        if not isinstance(vec, list) or len(vec) != len(names):
            got = len(vec) if isinstance(vec, list) else type(vec).__name__
            raise MltagError(f"expected {len(names)} values per vector, got {got}", jf, line)
        if any(v not in (1, -1) or isinstance(v, bool) for v in vec):
            bad = next(v for v in vec if v not in (1, -1) or isinstance(v, bool))
            raise MltagError(f"vector values must be 1 or -1 in this format, got {bad!r}", jf, line)
        rel = _find_indexed_image(root, int(key))
        examples.append(Example(rel, tuple(1 if v == 1 else 0 for v in vec), f"{jf}:{line}"))
    return Dataset(names, examples, root, "labels_json")


def _json_vector_lines(jf: Path, n: int) -> list[int]:
    """Line number of each label vector (innermost numeric list), for messages."""
    text = read_user_text(jf)
    lines, stack, line, in_str, esc = [], [], 1, False, False
    for ch in text:
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
            continue
        if ch == "\n":
            line += 1
        elif ch == '"':
            in_str = True
            if stack:
                stack[-1][2] = True
        elif ch == "[":
            if stack:
                stack[-1][1] = True
            stack.append([line, False, False])
        elif ch == "]" and stack:
            start, has_child, has_str = stack.pop()
            if not has_child and not has_str:
                lines.append(start)
    return lines[-n:] if len(lines) >= n else lines + [lines[-1] if lines else 1] * (n - len(lines))


def _first(folder: Path, *names: str) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def read_image_list_dataset(src: Path) -> Dataset:
    root = src if src.is_dir() else src.parent
    lf = _first(root, "image_list", "image_list.txt")
    mf = _first(root, "image_label", "image_label.txt")
    if lf is None or mf is None:
        raise MltagError("image_list format needs both image_list and image_label files", root)
    labels = _labels_near(root)
    list_lines = [(i, ln) for i, ln in enumerate(read_user_text(lf).splitlines(), 1) if ln.strip()]
    mat_lines = [(i, ln) for i, ln in enumerate(read_user_text(mf).splitlines(), 1) if ln.strip()]
    if len(list_lines) != len(mat_lines):
        raise MltagError(
            f"{lf.name} has {len(list_lines)} entries but {mf.name} has {len(mat_lines)} rows; they must match line for line",
            mf,
        )
    examples, seen = [], {}
    for (li, lline), (mi, mline) in zip(list_lines, mat_lines):
        cols = lline.split()
        if len(cols) != 2 or not cols[1].lstrip("-").isdigit():
            raise MltagError("expected 'file count'", lf, li)
        flags = mline.split()
        if len(flags) != len(labels):
            raise MltagError(f"expected {len(labels)} label flags, got {len(flags)}", mf, mi)
        if any(f not in ("0", "1") for f in flags):
            bad = next(f for f in flags if f not in ("0", "1"))
            raise MltagError(f"label flags must be 0 or 1, got {bad!r}", mf, mi)
        flags_t = tuple(int(f) for f in flags)
        if int(cols[1]) != sum(flags_t):
            raise MltagError(
                f"count column says {cols[1]} labels but line {mi} of {mf.name} has {sum(flags_t)}", lf, li
            )
        rel = _check_rel(cols[0], root, f"{lf}:{li}")
        if rel in seen:
            raise MltagError(f"duplicate path {rel!r} (first on line {seen[rel]})", lf, li)
        seen[rel] = li
        examples.append(Example(rel, flags_t, f"{lf}:{li}"))
    return Dataset(labels, examples, root, "image_list")


def read_folders_dataset(src: Path) -> Dataset:
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise MltagError("no class folders found", src)
    examples = []
    for i, c in enumerate(classes):
        for f in sorted((src / c).rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                rel = f.relative_to(src).as_posix()
                flags = tuple(1 if j == i else 0 for j in range(len(classes)))
                examples.append(Example(rel, flags, f"{f}:0"))
    return Dataset(classes, examples, src, "folders")


def read_csv_dataset(src: Path) -> Dataset:
    files = [src] if src.is_file() else _not_reviewed(src.glob("*.csv"))
    if len(files) != 1:
        raise MltagError(f"expected one .csv file, found {len(files)}", src)
    cf = files[0]
    root = cf.parent
    known = None
    if _first(root, "labels.txt", "classes.txt"):
        known = _labels_near(root)
    rows = []
    with io.StringIO(read_user_text(cf), newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise MltagError("empty CSV", cf)
        cols = [h.strip().lower() for h in header]
        pcol = next((cols.index(c) for c in ("path", "image", "file", "filename", "image_name") if c in cols), None)
        lcol = next((cols.index(c) for c in ("labels", "tags", "label") if c in cols), None)
        if pcol is None or lcol is None:
            raise MltagError(f"header must name a path column and a labels column, got {header}", cf, 1)
        errors = RowErrors(cf)
        for line, row in csv_rows(reader, len(header), cf, errors):
            rows.append((line, row[pcol], row[lcol].split()))
    names = known or sorted({n for _, _, ls in rows for n in ls})
    index = {n: i for i, n in enumerate(names)}
    examples, seen = [], {}
    for line, p, ls in rows:
        with errors.row():
            unknown = [n for n in ls if n not in index]
            if unknown:
                raise MltagError(f"unknown label {unknown[0]!r} (known: {', '.join(names)})", cf, line)
            rel = _check_rel(p, root, f"{cf}:{line}")
            if rel in seen:
                raise MltagError(f"duplicate path {rel!r} (first on line {seen[rel]})", cf, line)
            seen[rel] = line
            flags = tuple(1 if n in ls else 0 for n in names)
            examples.append(Example(rel, flags, f"{cf}:{line}"))
    errors.errors.sort(key=lambda e: e.line)
    errors.check()
    return Dataset(names, examples, root, "csv")


READERS = {
    "lst": read_lst_dataset,
    "labels_json": read_labels_json_dataset,
    "image_list": read_image_list_dataset,
    "folders": read_folders_dataset,
    "csv": read_csv_dataset,
}


def detect_format(src: Path) -> str:
    """Pick the input format from what is in ``src``; ambiguity is an error."""
    if not src.exists():
        raise MltagError("input not found", src)
    if src.is_file():
        by_ext = {".lst": "lst", ".csv": "csv", ".json": "labels_json"}
        if src.suffix in by_ext:
            return by_ext[src.suffix]
        if src.name.startswith(("image_list", "image_label")):
            return "image_list"
        raise MltagError("cannot tell the format of this file; pass --format", src)
    found = []
    if _not_reviewed(src.glob("*.lst")):
        found.append("lst")
    if _not_reviewed(src.glob("*.csv")):
        found.append("csv")
    if _first(src, "image_list", "image_list.txt"):
        found.append("image_list")
    if (src / "labels.json").is_file() and _json_kind(src / "labels.json") == "vectors":
        found.append("labels_json")
    lj = src / "labels.json"
    if lj.is_file() and _json_kind(lj) in ("invalid", "unknown"):
        raise MltagError("neither a list of label names nor label vectors per image (or invalid JSON)", lj)
    if not found and not any((src / n).is_file() for n in ("labels.txt", "labels.json", "classes.txt")):
        subdirs = [d for d in src.iterdir() if d.is_dir() and not d.name.startswith(".")]
        if subdirs and not any(f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS for f in src.iterdir()):
            found.append("folders")
    if not found:
        raise MltagError(f"no supported dataset found (formats: {', '.join(FORMATS)})", src)
    if len(found) > 1:
        raise MltagError(f"ambiguous input: looks like {' and '.join(found)}; pass --format", src)
    return found[0]


def read_dataset(src: str | os.PathLike, fmt: str) -> Dataset:
    src = Path(src)
    fmt = detect_format(src) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise MltagError(f"unknown format {fmt!r}; choose from auto, {', '.join(FORMATS)}")
    if not src.exists():
        raise MltagError("input not found", src)
    ds = READERS[fmt](src)
    for name in ds.labels:  # a label file's names are checked line by line as it is read; these too
        check_label_name(name, src)
    return ds
