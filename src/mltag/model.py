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

    def scores(self, images, batch_size: int = 32) -> np.ndarray:
        """Per-label scores ``[len(images), n_labels]``."""
        import tensorflow as tf

        out = []
        for i in range(0, len(images), batch_size):
            px = self.pixels(images[i: i + batch_size])
            out.append(self._fn(images=tf.constant(px))["scores"].numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), np.float32)

    def predict(self, images) -> list[dict]:
        """Per image: the labels at or above their threshold, and every label's score."""
        s = self.scores(images)
        return [
            {"labels": [lb for lb, v, t in zip(self.labels, row, self.thresholds) if v >= t],
             "scores": {lb: float(v) for lb, v in zip(self.labels, row)}}
            for row in s
        ]
