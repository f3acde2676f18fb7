"""The end-to-end inference model: raw image in, per-label scores (and labels) out.

A trained model folder holds ``model.tflite`` (LiteRT: uint8 pixels -> scores, backbone
and head together), ``backbone/`` (the feature-vector SavedModel) with ``head.npz`` (what
the TF engine runs, the head in numpy), ``model.json`` (labels, image size, backbone id)
and, once calibrated, ``thresholds.json``. A folder from before ``backbone/`` holds one
end-to-end SavedModel, ``inference/``, which still loads. Decoding uses ``mltag.data.images.load_image``, the
very function the bottleneck step used, so serving sees the pixels training saw.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from mltag import config
from mltag.data.formats import check_output_width, read_model_meta, read_thresholds
from mltag.data.images import load_image
from mltag.errors import MltagError
from mltag.inference.export import BACKBONE_DIR
from mltag.metrics import decide, decision_rule
from mltag.tf_runtime import import_tensorflow
from mltag.workers import cpu_threads, imap_ordered


def _two_stage(model_dir: Path, labels: list[str]):
    """``uint8 [B,S,S,3] -> scores``: the folder's ``backbone/`` through TF, then ``head.npz`` in numpy."""
    from mltag.head.saved import load_head
    from mltag.inference.engine import TFEngine

    head = load_head(model_dir, labels)
    if head is None:
        raise MltagError("model folder has backbone/ but no head.npz; retrain it", model_dir)
    backbone = TFEngine(str(model_dir / BACKBONE_DIR))
    return lambda px: head.predict(backbone(px))


class InferenceModel:
    """Load a model folder (or one of its ``.tflite`` files) and score raw images (paths or encoded bytes).

    ``engine``: ``auto`` runs ``model.tflite`` through LiteRT when no GPU is visible and the
    file exists, else the backbone SavedModel through TF (the head in numpy); ``litert`` and ``tf`` force one. A path to a
    ``.tflite`` file runs that file (labels and thresholds come from the folder it is in).
    """

    def __init__(self, model_dir: str | os.PathLike, thresholds: dict | None = None, engine: str = "auto"):
        from mltag.inference.engine import LiteRTEngine, resolve_engine

        model_dir = Path(model_dir)
        tflite = None
        if model_dir.suffix == ".tflite":
            if not model_dir.is_file():
                raise MltagError("model file not found", model_dir)
            tflite, model_dir = model_dir, model_dir.parent
            engine = "litert"
        self.meta = read_model_meta(model_dir)  # the content hash and the label list, checked
        self.labels: list[str] = self.meta["labels"]
        from mltag.head.saved import check_head_labels

        check_head_labels(model_dir, self.labels)  # a reordered label list would name every score wrongly
        self.image_size: int = int(self.meta["image_size"])
        if tflite is None and (model_dir / "model.tflite").is_file() and engine != "tf" \
                and resolve_engine(engine) == "litert":
            tflite = model_dir / "model.tflite"
        if engine == "litert" and tflite is None:
            raise MltagError("engine litert needs model.tflite in the model folder (retrain with this mltag)",
                             model_dir)
        if tflite is None and self.meta.get("precision") == "int8":  # its head learnt int8 vectors
            raise MltagError("this model's head was trained on a fully int8 backbone's vectors (backbone.precision "
                             "int8): it runs through LiteRT only (engine auto or litert, model.tflite)", model_dir)
        self._tflite = tflite
        self._lock = threading.Lock()
        if tflite is not None:
            lite = LiteRTEngine(tflite)
            check_output_width(self.labels, lite.output_width, tflite)
            self.engine = "litert"
            self._run = lite
        elif (model_dir / BACKBONE_DIR).is_dir():  # backbone SavedModel through TF, the head in numpy
            self.engine = "tf"
            self._run = _two_stage(model_dir, self.labels)
        else:  # a folder from before backbone/: one end-to-end SavedModel
            tf = import_tensorflow()

            fn = tf.saved_model.load(str(model_dir / "inference")).signatures["serving_default"]
            check_output_width(self.labels, fn.structured_outputs["scores"].shape[-1], model_dir / "inference")
            self.engine = "tf"
            self._run = lambda px: fn(images=tf.constant(np.ascontiguousarray(px)))["scores"].numpy()
        if thresholds is None and (model_dir / "thresholds.json").is_file():
            thresholds = read_thresholds(model_dir / "thresholds.json", self.labels)
        # min_labels: calibrate's at_least_one; groups: exclusive label groups (the top-scoring one of each)
        t, self.min_labels, self.groups = decision_rule(thresholds, self.labels)
        self.thresholds = t.astype(np.float32)

    def chosen(self, scores: np.ndarray) -> list[list[str]]:
        """Each score row's labels: at or above their thresholds, the top-scoring one of each exclusive group,
        and with calibrate's ``at_least_one`` the top-scoring one where none is."""
        return [[lb for lb, hit in zip(self.labels, row) if hit] for row in decide(scores, self.thresholds,
                                                                                    self.min_labels, self.groups)]

    def _locked_run(self, pixels: np.ndarray) -> np.ndarray:
        """One engine call at a time: a LiteRT interpreter is not thread-safe, and a server (``mlflow models
        serve``) calls predict from several threads at once. Decoding, outside the lock, still overlaps."""
        with self._lock:
            return self._run(pixels)

    def lanes(self) -> list:
        """Runners ``uint8 [1,S,S,3] -> scores [1,L]`` for callers that keep several busy from their own
        threads: with LiteRT one single-threaded interpreter per core (the bottleneck step's layout),
        else the one engine (TF spreads a call over the cores itself)."""
        if self._tflite is None or cpu_threads() < 2:
            return [self._run]
        from mltag.inference.engine import LiteRTEngine

        return LiteRTEngine(self._tflite, 1, cpu_threads()).lanes()

    def pixels(self, images) -> np.ndarray:
        return np.stack(list(imap_ordered(lambda im: load_image(im, self.image_size), images)))

    def tta_views(self, image) -> np.ndarray:
        """Ten views: centre and four corner crops of a 1.15x resize, and their mirrors."""
        s = self.image_size
        big = load_image(image, int(round(s * 1.15)))
        o = big.shape[0] - s
        crops = [big[o // 2: o // 2 + s, o // 2: o // 2 + s], big[:s, :s], big[:s, o:], big[o:, :s], big[o:, o:]]
        return np.stack(crops + [c[:, ::-1] for c in crops])

    def scores(self, images, batch_size: int = 32, tta: str = "none") -> np.ndarray:
        """Per-label scores ``[len(images), n_labels]``.

        Args:
            tta: ``none``, or ``mean``/``max`` to combine the scores of ten augmented views.
        """
        allowed = config.choices("evaluate", "tta")
        if tta not in allowed:
            raise MltagError(f"tta must be one of {', '.join(allowed)}, got {tta!r}")
        if tta != "none":
            reduce = np.mean if tta == "mean" else np.max
            out = [reduce(self._locked_run(views), axis=0) for views in imap_ordered(self.tta_views, images)]
            return np.stack(out) if out else np.zeros((0, len(self.labels)), np.float32)
        out = [self._locked_run(self.pixels(images[i: i + batch_size])) for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def predict(self, images, tta: str = "none") -> list[dict]:
        """Per image: its labels (``chosen``) and every label's score."""
        s = self.scores(images, tta=tta)
        return [{"labels": chosen, "scores": {lb: float(v) for lb, v in zip(self.labels, row)}}
                for chosen, row in zip(self.chosen(s), s)]
