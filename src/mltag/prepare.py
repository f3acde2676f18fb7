"""prepare: labels and images in, canonical ``labels.txt`` + stable stratified splits out.

Accepted inputs (auto-detected where unambiguous, ``fmt`` overrides):

* ``lst``: ``index<TAB>flags...<TAB>relative/path`` lines + labels.txt / labels.json;
* ``labels_json``: labels.json holding one ``[1, -1, ...]`` vector per image, images
  named by 1-based index (``1.jpg``...), label order from labels.txt (or the JSON's
  ``"labels"`` key);
* ``image_list``: ``image_list`` (``file count``) + ``image_label`` (0/1 matrix), line for line;
* ``folders``: one folder per class (single-label data);
* ``csv``: ``path,labels`` with space-separated label names.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from mltag.common import (
    Example,
    MltagError,
    atomic_path,
    read_labels,
    read_lst,
    read_user_text,
    write_labels,
    write_lst,
)
from mltag.formats import SPLITS, image_root_of, load_prepared  # noqa: F401 - re-exported for callers
from mltag.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadImage, inspect_image

log = logging.getLogger(__name__)

FORMATS = ("lst", "labels_json", "image_list", "folders", "csv")


@dataclass
class Dataset:
    """Parsed input before image checks: label names, examples, and where images live."""

    labels: list[str]
    examples: list[Example]
    image_root: Path
    fmt: str
    rejected: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- format readers


def _check_rel(rel: str, root: Path, source: str) -> str:
    """Normalise a relative image path; refuse absolute paths and ones escaping the root."""
    path, _, line = source.rpartition(":")
    rel = rel.strip().replace("\\", "/")
    if not rel:
        raise MltagError("empty image path", path, int(line))
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("~") or (len(rel) > 1 and rel[1] == ":"):
        raise MltagError(f"absolute image path {rel!r} is not allowed; paths are relative to {root}", path, int(line))
    parts = [x for x in p.parts if x not in ("", ".")]
    if ".." in parts:
        raise MltagError(f"image path {rel!r} escapes the image root {root}", path, int(line))
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
    files = [src] if src.is_file() else sorted(src.glob("*.lst"))
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
    files = [src] if src.is_file() else sorted(src.glob("*.csv"))
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
        for row in reader:
            line = reader.line_num
            if not any(x.strip() for x in row):
                continue
            if len(row) != len(header):
                raise MltagError(f"expected {len(header)} columns, got {len(row)}", cf, line)
            rows.append((line, row[pcol], row[lcol].split()))
    names = known or sorted({n for _, _, ls in rows for n in ls})
    index = {n: i for i, n in enumerate(names)}
    examples, seen = [], {}
    for line, p, ls in rows:
        unknown = [n for n in ls if n not in index]
        if unknown:
            raise MltagError(f"unknown label {unknown[0]!r} (known: {', '.join(names)})", cf, line)
        rel = _check_rel(p, root, f"{cf}:{line}")
        if rel in seen:
            raise MltagError(f"duplicate path {rel!r} (first on line {seen[rel]})", cf, line)
        seen[rel] = line
        flags = tuple(1 if n in ls else 0 for n in names)
        examples.append(Example(rel, flags, f"{cf}:{line}"))
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
    if list(src.glob("*.lst")):
        found.append("lst")
    if list(src.glob("*.csv")):
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


def read_dataset(src: str | os.PathLike, fmt: str = "auto") -> Dataset:
    src = Path(src)
    fmt = detect_format(src) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise MltagError(f"unknown format {fmt!r}; choose from auto, {', '.join(FORMATS)}")
    if not src.exists():
        raise MltagError("input not found", src)
    return READERS[fmt](src)


# --------------------------------------------------------------------------- image checks


def outside_root(root: Path, rel: str) -> str | None:
    """Why ``root / rel`` is not inside ``root`` once symlinks are resolved, or None when it is."""
    real_root = root.resolve()
    real = (root / rel).resolve()
    if real == real_root or real_root in real.parents:
        return None
    return (f"a symlink to {real}, outside the image root {real_root} "
            "(set prepare.follow_symlinks: true to allow)")


def check_images(ds: Dataset, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 8,
                 progress: bool = True, follow_symlinks: bool = False) -> tuple[list[Example], dict[str, dict]]:
    """Decode every image; return the good examples and per-path info (hash, size, ahash).

    Unless ``follow_symlinks``, an image whose real path lies outside the image root (a
    symlink to a file or through a linked folder) is rejected: data outside the dataset is
    never read into training or reports.
    """
    from tqdm import tqdm

    def one(ex: Example):
        if not follow_symlinks and (why := outside_root(ds.image_root, ex.path)):
            return ex, None, why
        try:
            return ex, inspect_image(ds.image_root / ex.path, max_pixels), None
        except BadImage as e:
            return ex, None, str(e)

    good, infos = [], {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        it = pool.map(one, ds.examples)
        for ex, info, err in tqdm(it, total=len(ds.examples), desc="prepare: checking images", unit="img",
                                  disable=not progress, mininterval=1.0):
            if err:
                ds.rejected.append({"path": ex.path, "source": ex.source, "reason": err})
            else:
                good.append(ex)
                infos[ex.path] = info
    return good, infos


# --------------------------------------------------------------------------- splits


def _unit_hash(key: str, salt: str) -> float:
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:15], 16) / float(1 << 60)


def assign_splits(examples: list[Example], infos: dict[str, dict], val_fraction: float, test_fraction: float,
                  salt: str = "mltag") -> tuple[dict[str, str], list[dict]]:
    """Stable, label-stratified split of ``examples``.

    Each image goes by a hash of its group key (its relative path; exact duplicates
    share the smallest path of their group), so adding images never moves old ones.
    Labels missing from a split are then repaired deterministically by moving the
    group with the smallest hash from the split holding most of that label.

    Returns:
        ``{path: split}`` and the list of repairs made.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise MltagError(f"bad split fractions: val={val_fraction} test={test_fraction}")
    groups: dict[str, list[Example]] = defaultdict(list)
    by_sha: dict[str, str] = {}
    for ex in sorted(examples, key=lambda e: e.path):
        sha = infos.get(ex.path, {}).get("sha256", ex.path)
        key = by_sha.setdefault(sha, ex.path)
        groups[key].append(ex)
    split_of, u = {}, {}
    for key in groups:
        u[key] = _unit_hash(key, salt)
        split_of[key] = "test" if u[key] < test_fraction else "val" if u[key] < test_fraction + val_fraction else "train"
    wanted = [s for s, f in (("train", 1.0), ("val", val_fraction), ("test", test_fraction)) if f > 0]
    n_labels = len(examples[0].flags) if examples else 0
    repairs = []
    for j in range(n_labels):
        for target in wanted:
            holders = defaultdict(list)
            for key, exs in groups.items():
                if any(ex.flags[j] for ex in exs):
                    holders[split_of[key]].append(key)
            if holders.get(target) or sum(len(v) for v in holders.values()) < len(wanted):
                continue
            donor = max(holders, key=lambda s: (len(holders[s]), s == "train"))
            if len(holders[donor]) < 2:
                continue
            key = min(holders[donor], key=lambda k: u[k])
            split_of[key] = target
            repairs.append({"label_index": j, "moved": key, "from": donor, "to": target})
    return {ex.path: split_of[key] for key, exs in groups.items() for ex in exs}, repairs


# --------------------------------------------------------------------------- the step


def prepare(input: str | os.PathLike, out: str | os.PathLike, format: str = "auto", val_fraction: float = 0.15,
            test_fraction: float = 0.15, no_label: str = "keep", max_bad_fraction: float = 0.05,
            max_pixels: int = DEFAULT_MAX_PIXELS, salt: str = "mltag", dataset_version: str | None = None,
            progress: bool = True, follow_symlinks: bool = False, config: dict | None = None) -> dict:
    """Run the prepare step: read, validate, split and write the canonical dataset.

    Writes ``labels.txt``, ``train.lst``, ``val.lst``, ``test.lst``, ``dataset.json``,
    ``report.json`` and ``report.html`` into ``out`` (all or nothing).

    Returns:
        The report dict.
    """
    if no_label not in ("keep", "reject"):
        raise MltagError(f"prepare.no_label must be 'keep' or 'reject', got {no_label!r}")
    ds = read_dataset(input, format)
    if not ds.examples:
        raise MltagError("the dataset has no images", input)
    if no_label == "reject":
        kept = []
        for ex in ds.examples:
            if sum(ex.flags) == 0:
                ds.rejected.append({"path": ex.path, "source": ex.source, "reason": "no labels (prepare.no_label=reject)"})
            else:
                kept.append(ex)
        ds.examples = kept
    total = len(ds.examples) + len(ds.rejected)
    good, infos = check_images(ds, max_pixels=max_pixels, progress=progress, follow_symlinks=follow_symlinks)
    bad = [r for r in ds.rejected if not r["reason"].startswith("no labels")]
    if total and len(bad) / total > max_bad_fraction:
        listing = "\n".join(f"  {r['source']}: {r['path']}: {r['reason']}" for r in bad[:20])
        raise MltagError(
            f"{len(bad)} of {total} images are unusable ({len(bad) / total:.1%} > prepare.max_bad_fraction="
            f"{max_bad_fraction:.1%}):\n{listing}", input)
    for r in bad:
        log.warning("prepare: skipping %s: %s: %s", r["source"], r["path"], r["reason"])
    y = np.array([ex.flags for ex in good], dtype=np.int64).reshape(len(good), len(ds.labels))
    n_splits = sum(1 for f in (1.0, val_fraction, test_fraction) if f > 0)
    flags_of = {ex.path: ex.flags for ex in ds.examples}
    for j, name in enumerate(ds.labels):
        count = int(y[:, j].sum())
        if count < n_splits:
            lost = sum(1 for r in bad if flags_of.get(r["path"], (0,) * len(ds.labels))[j])
            extra = f" ({lost} of its images were rejected as unusable)" if lost else ""
            first = next((ex.source for ex in ds.examples if ex.flags[j]), None)
            if first and not lost:
                hint = "; a typo? a labels.txt beside the CSV makes unknown names an error" if ds.fmt == "csv" else ""
                extra += f" (first at {first}{hint})"
            raise MltagError(
                f"label {name!r} has {count} usable example(s){extra}; at least {n_splits} are needed so every "
                "split has one. Add examples or remove the label.", input)
    split_of, repairs = assign_splits(good, infos, val_fraction, test_fraction, salt)
    report = build_report(ds, good, infos, split_of, repairs, total, dataset_version, input)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_labels(tmp / "labels.txt", ds.labels)
        for s in SPLITS:
            write_lst(tmp / f"{s}.lst", sorted((ex for ex in good if split_of[ex.path] == s), key=lambda e: e.path))
        root = os.path.relpath(ds.image_root.resolve(), out.resolve())
        (tmp / "dataset.json").write_text(json.dumps({
            "image_root": root, "format": ds.fmt, "source": str(input), "dataset_version": dataset_version,
            "labels": ds.labels, "config": config}, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.html").write_text(report_html(report), encoding="utf-8")
    return report


def build_report(ds: Dataset, good: list[Example], infos: dict, split_of: dict, repairs: list, total: int,
                 dataset_version: str | None, input_path) -> dict:
    y = np.array([ex.flags for ex in good], dtype=np.int64).reshape(len(good), len(ds.labels))
    splits = np.array([split_of[ex.path] for ex in good])
    per_label = {
        name: {s: int(y[splits == s, j].sum()) for s in SPLITS} for j, name in enumerate(ds.labels)
    }
    card = y.sum(axis=1)
    dup_groups = defaultdict(list)
    for ex in good:
        dup_groups[infos[ex.path]["sha256"]].append(ex.path)
    duplicates = [sorted(v) for v in dup_groups.values() if len(v) > 1]
    near = []
    by_phash = defaultdict(list)
    for ex in good:
        by_phash[infos[ex.path]["phash"]].append(ex)
    for exs in by_phash.values():
        shas = {infos[e.path]["sha256"] for e in exs}
        sp = {split_of[e.path] for e in exs}
        if len(shas) > 1 and len(sp) > 1:
            near.append({"paths": sorted(e.path for e in exs), "splits": sorted(sp)})
    for r in repairs:
        r["label"] = ds.labels[r.pop("label_index")]
    return {
        "source": str(input_path),
        "format": ds.fmt,
        "dataset_version": dataset_version,
        "labels": ds.labels,
        "images_listed": total,
        "images_used": len(good),
        "images_per_split": {s: int((splits == s).sum()) for s in SPLITS},
        "examples_per_label": per_label,
        "label_cardinality": {
            "mean": float(card.mean()) if len(card) else 0.0,
            "histogram": {str(k): int((card == k).sum()) for k in range(int(card.max()) + 1)} if len(card) else {},
        },
        "cooccurrence": (y.T @ y).tolist(),
        "rejected": ds.rejected,
        "exact_duplicates": duplicates,
        "near_duplicates_across_splits": near,
        "stratification_repairs": repairs,
    }


def _png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def report_html(report: dict) -> str:
    """A small self-contained HTML summary with a co-occurrence heatmap."""
    import html

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = report["labels"]
    co = np.array(report["cooccurrence"])
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(labels), 0.8 + 0.6 * len(labels)))
    ax.imshow(co, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(co[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if co[i, j] > co.max() / 2 else "black")
    ax.set_title("label co-occurrence")
    img = _png_b64(fig)
    plt.close(fig)
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{c[s]}</td>" for s in SPLITS) + "</tr>"
        for n, c in report["examples_per_label"].items())
    rej = "".join(
        f"<tr><td>{html.escape(r['path'])}</td><td>{html.escape(r['source'])}</td><td>{html.escape(r['reason'])}</td></tr>"
        for r in report["rejected"]) or "<tr><td colspan=3>none</td></tr>"
    ips = report["images_per_split"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>mltag data report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px}}</style>
</head><body><h1>Data report</h1>
<p>Source <code>{html.escape(report['source'])}</code> ({report['format']}), version {html.escape(str(report['dataset_version']))}.
{report['images_used']} of {report['images_listed']} images used; train {ips['train']}, val {ips['val']}, test {ips['test']}.
Mean labels per image {report['label_cardinality']['mean']:.2f}.</p>
<h2>Examples per label</h2><table><tr><th>label</th><th>train</th><th>val</th><th>test</th></tr>{rows}</table>
<h2>Co-occurrence</h2><img src="data:image/png;base64,{img}">
<h2>Rejected files</h2><table><tr><th>path</th><th>listed at</th><th>reason</th></tr>{rej}</table>
<h2>Duplicates</h2><p>{len(report['exact_duplicates'])} groups of identical images (kept in one split);
{len(report['near_duplicates_across_splits'])} near-duplicate groups across splits.</p>
</body></html>
"""
