"""prepare: labels and images in, canonical ``labels.txt`` + stable stratified splits out.

The step is four parts, one module each: ``readers`` (five input formats in, one
``Dataset`` out), ``checks`` (decode every image, count usable examples per label),
``splits`` (stable stratified train/val/test) and ``report`` (JSON + HTML summary).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mltag.common import MltagError, atomic_path, write_labels, write_lst
from mltag.formats import HASHES_FILE, SPLITS, image_root_of, load_prepared, write_hashes  # noqa: F401 - re-exported
from mltag.images import DEFAULT_MAX_PIXELS
from mltag.prepare.checks import (  # noqa: F401 - outside_root re-exported
    check_bad_fraction,
    check_images,
    check_label_counts,
    outside_root,
    reject_unlabelled,
)
from mltag.prepare.readers import FORMATS, READERS, Dataset, detect_format, read_dataset  # noqa: F401 - re-exported
from mltag.prepare.report import build_report, report_html
from mltag.prepare.splits import assign_splits


def prepare(input: str | os.PathLike, out: str | os.PathLike, format: str = "auto", val_fraction: float = 0.15,
            test_fraction: float = 0.15, no_label: str = "keep", max_bad_fraction: float = 0.05,
            max_pixels: int = DEFAULT_MAX_PIXELS, salt: str = "mltag", dataset_version: str | None = None,
            progress: bool = True, follow_symlinks: bool = False, config: dict | None = None) -> dict:
    """Run the prepare step: read, validate, split and write the canonical dataset.

    Writes ``labels.txt``, ``train.lst``, ``val.lst``, ``test.lst``, ``hashes.tsv`` (each image's
    content hash, so later steps never hash the dataset again), ``dataset.json``,
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
        reject_unlabelled(ds)
    total = len(ds.examples) + len(ds.rejected)
    good, infos = check_images(ds, max_pixels=max_pixels, progress=progress, follow_symlinks=follow_symlinks)
    bad = check_bad_fraction(ds, total, max_bad_fraction, input)
    check_label_counts(ds, good, bad, sum(1 for f in (1.0, val_fraction, test_fraction) if f > 0), input)
    split_of, repairs = assign_splits(good, infos, val_fraction, test_fraction, salt)
    report = build_report(ds, good, infos, split_of, repairs, total, dataset_version, input)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_labels(tmp / "labels.txt", ds.labels)
        for s in SPLITS:
            write_lst(tmp / f"{s}.lst", sorted((ex for ex in good if split_of[ex.path] == s), key=lambda e: e.path))
        write_hashes(tmp / HASHES_FILE, {ex.path: (infos[ex.path]["sha256"], infos[ex.path]["bytes"]) for ex in good})
        root = os.path.relpath(ds.image_root.resolve(), out.resolve())
        (tmp / "dataset.json").write_text(json.dumps({
            "image_root": root, "format": ds.fmt, "source": str(input), "dataset_version": dataset_version,
            "labels": ds.labels, "config": config}, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.html").write_text(report_html(report), encoding="utf-8")
    return report
