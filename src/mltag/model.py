"""The end-to-end inference model: raw image in, per-label scores (and labels) out.

A trained model folder holds ``inference/`` (a SavedModel: uint8 pixels -> scores,
backbone and head together), ``model.json`` (labels, image size, backbone id) and,
once calibrated, ``thresholds.json``. Decoding uses ``mltag.images.load_image``, the
very function the bottleneck step used, so serving sees the pixels training saw.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mltag.common import MltagError
from mltag.images import load_image


def export_inference_model(backbone_location: str, head_weights: list[np.ndarray], image_size: int,
                           out: str | os.PathLike) -> None:
    """Save backbone + dense head as one SavedModel: ``serving_default(images uint8 [B,S,S,3]) -> scores``."""
    import tensorflow as tf
    import tensorflow_hub as hub

    class EndToEnd(tf.Module):
        def __init__(self):
            super().__init__()
            self.backbone = hub.load(backbone_location)
            self.kernels = [tf.Variable(w, trainable=False) for w in head_weights[0::2]]
            self.biases = [tf.Variable(b, trainable=False) for b in head_weights[1::2]]

        @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, name="images")])
        def serve(self, images):
            x = self.backbone(tf.cast(images, tf.float32) / 255.0)
            # The head's Dense layers: relu on hidden layers, sigmoid on the output.
            for i, (k, b) in enumerate(zip(self.kernels, self.biases)):
                x = tf.matmul(x, k) + b
                x = tf.nn.relu(x) if i < len(self.kernels) - 1 else tf.sigmoid(x)
            return {"scores": x}

    m = EndToEnd()
    tf.saved_model.save(m, str(out), signatures={"serving_default": m.serve})


class InferenceModel:
    """Load a model folder and score raw images (paths or encoded bytes)."""

    def __init__(self, model_dir: str | os.PathLike, thresholds: dict | None = None):
        import tensorflow as tf

        model_dir = Path(model_dir)
        meta_file = model_dir / "model.json"
        if not meta_file.is_file():
            raise MltagError("not an mltag model folder (model.json missing)", model_dir)
        self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        self.labels: list[str] = self.meta["labels"]
        self.image_size: int = int(self.meta["image_size"])
        self._fn = tf.saved_model.load(str(model_dir / "inference")).signatures["serving_default"]
        if thresholds is None and (model_dir / "thresholds.json").is_file():
            thresholds = json.loads((model_dir / "thresholds.json").read_text(encoding="utf-8"))
        self.thresholds = np.array(
            [float((thresholds or {}).get("thresholds", {}).get(lb, 0.5)) for lb in self.labels], np.float32)

    def pixels(self, images) -> np.ndarray:
        return np.stack([load_image(im, self.image_size) for im in images])

    def tta_views(self, image) -> np.ndarray:
        """Ten views: centre and four corner crops of a 1.15x resize, and their mirrors."""
        s = self.image_size
        big = load_image(image, int(round(s * 1.15)))
        o = big.shape[0] - s
        crops = [big[o // 2: o // 2 + s, o // 2: o // 2 + s], big[:s, :s], big[:s, o:], big[o:, :s], big[o:, o:]]
        return np.stack(crops + [c[:, ::-1] for c in crops])

    def _run(self, px: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        return self._fn(images=tf.constant(np.ascontiguousarray(px)))["scores"].numpy()

    def scores(self, images, batch_size: int = 32, tta: str = "none") -> np.ndarray:
        """Per-label scores ``[len(images), n_labels]``.

        Args:
            tta: ``none``, or ``mean``/``max`` to combine the scores of ten augmented views.
        """
        if tta not in ("none", "mean", "max"):
            raise MltagError(f"tta must be none, mean or max, got {tta!r}")
        if tta != "none":
            reduce = np.mean if tta == "mean" else np.max
            out = [reduce(self._run(self.tta_views(im)), axis=0) for im in images]
            return np.stack(out) if out else np.zeros((0, len(self.labels)), np.float32)
        out = [self._run(self.pixels(images[i: i + batch_size])) for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def predict(self, images, tta: str = "none") -> list[dict]:
        """Per image: the labels at or above their threshold, and every label's score."""
        s = self.scores(images, tta=tta)
        return [
            {"labels": [lb for lb, v, t in zip(self.labels, row, self.thresholds) if v >= t],
             "scores": {lb: float(v) for lb, v in zip(self.labels, row)}}
            for row in s
        ]
