"""``mltag predict``: label images in bulk with a local or registered model.

Images come from files, folders (searched recursively), globs or list files, in any mix.
A registered model (``models:/NAME@alias``, ``runs:/...``) is downloaded once and run like a
local folder. Each image is decoded once, in a thread pool, a bounded window ahead of the
engine; with LiteRT the engine is one single-threaded interpreter per core (lanes), each
taking the next decoded image, as the bottleneck step runs the backbone. An unreadable
image gets its reason in its own output row; the others are predicted.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

from mltag.data.listing import expand_images
from mltag.errors import MltagError
from mltag.workers import cpu_threads, imap_ordered


def resolve_model(model: str, tracking_uri: str | None = None) -> Path:
    """A local model folder (or ``.tflite`` inside one) as is; a ``models:/`` or ``runs:/`` URI downloaded once."""
    p = Path(model)
    if (p.is_dir() and (p / "model.json").is_file()) or (p.suffix == ".tflite" and p.is_file()):
        return p
    from mltag.tracking.runs import local_model

    return local_model(model, tracking_uri)


def _thresholds_for(folder: Path) -> dict | None:
    """A model folder's thresholds: its own thresholds.json, else the one beside it (``dvc repro``'s layout)."""
    from mltag.data.formats import read_thresholds

    t = folder.parent / "thresholds.json"
    if not (folder / "thresholds.json").is_file() and t.is_file():
        return read_thresholds(t)
    return None


def run_batch(model, paths: list[str], progress: bool = False, tta: str = "none"):
    """Yield ``(path, scores or None, error or None)`` in input order; decoding pipelined, LiteRT in lanes."""
    from tqdm import tqdm

    from mltag.data.images import BadImage, load_image

    def decode(path):
        try:
            return load_image(path, model.image_size), None
        except BadImage as e:
            return None, str(e)

    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, mininterval=1.0, file=sys.stderr)
    if tta != "none":  # ten views per image: the batch path, one image at a time
        for path in paths:
            try:
                yield path, model.scores([path], tta=tta)[0], None
            except BadImage as e:
                yield path, None, str(e)
            bar.update(1)
        bar.close()
        return
    from mltag.inference.lanes import in_lanes

    lanes = model.lanes()
    decoded = imap_ordered(decode, paths, cpu_threads(), ahead=4 * len(lanes) + 4)
    results = in_lanes(decoded, lanes, lambda run, d: d if d[0] is None else (run(d[0][None])[0], None))
    try:
        for path, (scores, err) in zip(paths, results):
            bar.update(1)
            yield path, scores, err
    finally:
        results.close()  # stops the lanes after their current image
        decoded.close()
        bar.close()


def predict(model_ref: str, images: list[str], out_format: str = "text", out=None, tta: str = "none",
            tracking_uri: str | None = None, progress: bool | None = None, expand: bool = True,
            explain: str | os.PathLike | None = None) -> tuple[int, int]:
    """Predict every image; write one row per image to ``out`` (default stdout), as it goes. Returns
    ``(ok, failed)``. ``expand`` False: ``images`` are image paths already (a batch pipeline's shard).
    ``explain``: also write an occlusion-saliency overlay PNG per image and chosen label into this folder
    (``<n>-<image name>.<label>.png``; ``mltag.inference.explain``)."""
    from mltag.inference.model import InferenceModel

    if out_format not in ("text", "csv", "jsonl"):
        raise MltagError(f"--format must be text, csv or jsonl, got {out_format!r}")
    paths, expanded = expand_images(images) if expand else (list(images), False)
    folder = resolve_model(model_ref, tracking_uri)
    model = InferenceModel(folder, _thresholds_for(folder if folder.is_dir() else folder.parent))
    out = out or sys.stdout
    labels = model.labels
    explainer = None
    if explain is not None:
        from mltag.inference.explain import Explainer

        if Path(explain).exists() and not Path(explain).is_dir():
            raise MltagError("--explain names a folder for the overlay PNGs; this is a file", explain)
        Path(explain).mkdir(parents=True, exist_ok=True)
        explainer = Explainer(model)
    writer = None
    if out_format == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["path", "labels", "error", *(f"score_{lb}" for lb in labels)])
    ok = failed = 0
    for path, scores, err in run_batch(model, paths, progress=expanded if progress is None else progress, tta=tta):
        chosen = model.chosen([scores])[0] if scores is not None else []
        if explainer is not None and err is None and chosen:
            explainer.write_overlays(path, [labels.index(lb) for lb in chosen], explain, f"{ok + failed + 1:05d}-{Path(path).stem}")
        if err is None:
            ok += 1
        else:
            failed += 1
        if out_format == "csv":
            writer.writerow([path, " ".join(chosen), err or "",
                             *([f"{s:.6f}" for s in scores] if scores is not None else [""] * len(labels))])
        elif out_format == "jsonl":
            row = {"image": path, "labels": chosen,
                   "scores": {lb: float(s) for lb, s in zip(labels, scores)} if scores is not None else None}
            if err is not None:
                row["error"] = err
            out.write(json.dumps(row) + "\n")
        elif err is None:
            lab = ", ".join(f"{lb} ({s:.2f})" for lb, s in zip(labels, scores) if lb in chosen) or "(no label)"
            out.write(f"{path}: {lab}\n")
        else:
            out.write(f"{path}: error: {err}\n")
    out.flush()
    return ok, failed
