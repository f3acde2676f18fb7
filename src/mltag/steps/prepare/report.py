"""prepare's data report: counts, duplicates and co-occurrence as JSON, and the same as one HTML page."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from mltag.data.datasets import Dataset
from mltag.data.formats import SPLITS, Example
from mltag.reports.html import data_uri, figure_png, new_axes, render


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
    flags_of = {ex.path: ex.flags for ex in good}
    conflicting = [{"paths": g, "labels": [[ds.labels[j] for j, f in enumerate(flags_of[p]) if f] for p in g]}
                   for g in duplicates if len({flags_of[p] for p in g}) > 1]
    short = np.array([min(infos[ex.path].get("width", 0), infos[ex.path].get("height", 0)) for ex in good])
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
        "conflicting_duplicates": conflicting,  # the same bytes under other names, with other labels
        "image_short_side": ({"min": int(short.min()), "median": int(np.median(short)), "max": int(short.max())}
                             if len(short) else None),
        "near_duplicates_across_splits": near,
        "stratification_repairs": repairs,
    }


def cooccurrence_png(labels: list[str], co: np.ndarray) -> bytes:
    """Heatmap of how often each pair of labels appears on the same image (diagonal: label counts)."""
    fig, ax = new_axes((1 + 0.6 * len(labels), 0.8 + 0.6 * len(labels)))
    ax.imshow(co, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(co[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if co[i, j] > co.max() / 2 else "black")
    ax.set_title("label co-occurrence")
    return figure_png(fig)


def report_html(report: dict) -> str:
    """The report as one self-contained HTML page with a co-occurrence heatmap."""
    png = cooccurrence_png(report["labels"], np.array(report["cooccurrence"]))
    return render("data_report.html.j2", r=report, splits=SPLITS, cooccurrence_png=data_uri(png),
                  max_rows=HTML_MAX_ROWS)


HTML_MAX_ROWS = 500  # rows of a list in the page (rejected files, repairs): a million-image set stays a small page
