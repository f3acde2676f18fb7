"""Exporting the end-to-end model: backbone and head as one SavedModel, and its LiteRT file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from mltag.errors import MltagError
from mltag.tf_runtime import import_tensorflow

log = logging.getLogger("mltag.train")


def write_model_folder(folder: Path, head_weights: list[np.ndarray], dropout: float, backbone_location: str,
                       tuned_net, meta: dict) -> None:
    """A model folder's model files: ``head.npz`` (the weights, arrays only), ``head.keras`` (the same
    weights as a Keras model), ``inference/`` (backbone + head, one SavedModel), ``model.tflite`` (the
    same for LiteRT) and ``model.json``. ``tuned_net`` is a fine-tuned ``LiteNet``, or None for the
    backbone at ``backbone_location`` as it is."""
    from mltag.formats import write_head, write_model_meta
    from mltag.head import to_keras

    write_head(folder, head_weights)
    to_keras(head_weights, dropout).save(folder / "head.keras")
    if tuned_net is None:
        export_inference_model(backbone_location, head_weights, meta["image_size"], folder / "inference")
    else:  # the tuned backbone, written as a SavedModel the same way as the built-in one
        import tempfile

        from mltag.backbone import build_builtin

        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            tuned = build_builtin(tuned_net.name, Path(scratch) / "backbone", tuned_net.state_dict())
            export_inference_model(str(tuned), head_weights, meta["image_size"], folder / "inference")
    try:  # the same model for LiteRT: what predict, TTA and serving run on CPU
        export_tflite(folder / "inference", folder / "model.tflite")
    except MltagError as e:
        log.warning("train: no model.tflite (%s); inference will use TF", e)
    write_model_meta(folder, meta)


def export_inference_model(backbone_location: str, head_weights: list[np.ndarray], image_size: int,
                           out: str | os.PathLike) -> None:
    """Save backbone + dense head as one SavedModel: ``serving_default(images uint8 [B,S,S,3]) -> scores``."""
    tf = import_tensorflow()

    from mltag.backbone import tensorflow_hub

    hub = tensorflow_hub()

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


def export_tflite(saved_model: str | os.PathLike, out: str | os.PathLike,
                  representative: list[np.ndarray] | None = None, dynamic_range: bool = False) -> Path:
    """Convert the end-to-end SavedModel to ``.tflite``: uint8 pixels in, float32 scores out.

    With ``representative`` (uint8 images ``[S,S,3]``, e.g. a hundred training images) the
    weights and activations are quantized to int8 (post-training quantization, calibrated on
    those images); input and output stay uint8 pixels and float scores.
    """
    tf = import_tensorflow()

    from mltag.files import atomic_path

    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=["serving_default"])
    if dynamic_range:  # int8 weights, float activations: no calibration data, smaller loss
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif representative is not None:
        def gen():
            for px in representative:
                yield [np.asarray(px, np.uint8)[None]]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = gen
    try:
        data = conv.convert()
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds
        raise MltagError(f"cannot convert the model to TFLite: {type(e).__name__}: {str(e)[:300]}",
                         saved_model) from None
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return out
