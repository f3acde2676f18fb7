"""prepare: labels and images in, canonical ``labels.txt`` + stable stratified splits out.

The step is four parts, one module each: ``readers`` (five input formats in, one
``Dataset`` out), ``checks`` (decode every image, count usable examples per label),
``splits`` (stable stratified train/val/test) and ``report`` (JSON + HTML summary).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mltag import config
from mltag.data.datasets import read_dataset
from mltag.data.formats import (
    HASHES_FILE,
    SPLITS,
    write_dataset_meta,
    write_hashes,
    write_labels,
    write_lst,
)
from mltag.errors import MltagError
from mltag.files import atomic_path
from mltag.steps.prepare.checks import (
    check_bad_fraction,
    check_images,
    check_label_counts,
    reject_unlabelled,
)
from mltag.steps.prepare.report import build_report, report_html
from mltag.steps.prepare.splits import assign_splits


def _label_groups(setting: str, labels: list[str], good, split_of: dict) -> list[list[str]]:
    """The exclusive label groups of ``prepare.label_groups``: found in the train+val labels (``auto``, each label
    with at least 5 images), none, or declared (then every image must keep to them, or it is an error naming the
    first that do not, with the line they came from)."""
    import numpy as np

    from mltag.data.groups import check_declared, find_groups, parse_groups

    declared = parse_groups(setting, labels, "params.yaml")
    if declared is not None:
        y = np.array([ex.flags for ex in good], dtype=np.int8).reshape(len(good), len(labels))
        check_declared(declared, labels, y, [ex.source or ex.path for ex in good], "params.yaml")
        return declared
    fit = [ex for ex in good if split_of[ex.path] != "test"]
    y = np.array([ex.flags for ex in fit], dtype=np.int8).reshape(len(fit), len(labels))
    return [[labels[i] for i in g] for g in find_groups(y, min_positives=5)]


def prepare(out: str | os.PathLike, *, prepare: config.Prepare, dataset_version: str | None = None,
            progress: bool = True, config: dict | None = None) -> dict:
    """Run the prepare step: read ``prepare.input``, validate, split and write the canonical dataset.

    Writes ``labels.txt``, ``train.lst``, ``val.lst``, ``test.lst``, ``hashes.tsv`` (each image's
    content hash, so later steps never hash the dataset again), ``dataset.json``,
    ``report.json`` and ``report.html`` into ``out`` (all or nothing).

    Returns:
        The report dict.
    """
    input, val_fraction, test_fraction = prepare.input, prepare.val_fraction, prepare.test_fraction
    ds = read_dataset(input, prepare.format)
    if not ds.examples:
        raise MltagError("the dataset has no images", input)
    if not ds.labels:
        raise MltagError(f"no image has a label ({len(ds.examples)} images, every label list empty): there is nothing "
                         "to learn; give each image its labels (docs/data.md: the label file formats)", input)
    if prepare.no_label == "reject":
        reject_unlabelled(ds)
    total = len(ds.examples) + len(ds.rejected)
    good, infos = check_images(ds, max_pixels=prepare.max_pixels, progress=progress,
                               follow_symlinks=prepare.follow_symlinks)
    bad = check_bad_fraction(ds, total, prepare.max_bad_fraction, input)
    check_label_counts(ds, good, bad, sum(1 for f in (1.0, val_fraction, test_fraction) if f > 0), input)
    split_of, repairs = assign_splits(good, infos, val_fraction, test_fraction, prepare.salt)
    report = build_report(ds, good, infos, split_of, repairs, total, dataset_version, input)
    report["label_groups"] = _label_groups(prepare.label_groups, ds.labels, good, split_of)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_labels(tmp / "labels.txt", ds.labels)
        for s in SPLITS:
            write_lst(tmp / f"{s}.lst", sorted((ex for ex in good if split_of[ex.path] == s), key=lambda e: e.path))
        write_hashes(tmp / HASHES_FILE, {ex.path: (infos[ex.path]["sha256"], infos[ex.path]["bytes"]) for ex in good})
        root = os.path.relpath(ds.image_root.resolve(), out.resolve())
        write_dataset_meta(tmp, {"image_root": root, "input_format": ds.fmt, "source": str(input),
                                 "dataset_version": dataset_version, "labels": ds.labels,
                                 "label_groups": report["label_groups"], "config": config})
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.html").write_text(report_html(report), encoding="utf-8")
    return report
