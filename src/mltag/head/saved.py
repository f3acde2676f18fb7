"""A model folder's head: loading ``head.npz`` (checked against the label list), scoring cached vectors with it,
and the Keras model of folders from before ``head.npz``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mltag.data.formats import check_output_width, read_model_meta
from mltag.head.model import NumpyHead
from mltag.tf_runtime import import_tensorflow


def build_head(dim: int, n_labels: int, hidden_units: int, dropout: float):
    import_tensorflow()  # keras' TF backend: without its start-up noise
    import keras

    inputs = keras.Input((dim,), name="features")
    x = inputs
    if dropout > 0:
        x = keras.layers.Dropout(dropout)(x)
    if hidden_units > 0:
        x = keras.layers.Dense(hidden_units, activation="relu", name="hidden")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(n_labels, activation="sigmoid", name="scores")(x)
    return keras.Model(inputs, outputs, name="mltag_head")


def to_keras(head: NumpyHead | list[np.ndarray], dropout: float):
    """The trained head (or its weights) as a Keras model: what model folders from before ``head.npz`` saved
    (``head.keras``), and the reference a test holds the numpy head to."""
    weights = head.weights if isinstance(head, NumpyHead) else head
    hidden = weights[0].shape[1] if len(weights) == 4 else 0
    model = build_head(weights[0].shape[0], weights[-1].shape[0], hidden, dropout)
    model.set_weights(weights)
    return model


def predict_head(model, features: np.ndarray) -> np.ndarray:
    if isinstance(model, NumpyHead):
        return model.predict(features)
    if len(features) == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    return np.asarray(model.predict(np.asarray(features, np.float32), batch_size=1024, verbose=0), np.float32)


def head_scores(model_dir: str | os.PathLike, features: np.ndarray) -> np.ndarray:
    """Score cached bottleneck vectors with the model folder's head: ``head.npz`` in numpy (no
    TensorFlow import), the very weights the end-to-end ``model.tflite`` holds
    (tests/integration/test_steps.py checks the two agree to 1e-6). A folder from before ``head.npz``
    is scored through Keras."""
    labels = read_model_meta(model_dir)["labels"]
    head = load_head(model_dir, labels)
    if head is None:
        return _keras_head_scores(model_dir, labels, features)
    return head.predict(features)


def check_head_labels(folder: str | os.PathLike, labels: list[str]) -> None:
    """The model's label list (model.json) against the names its head was trained with (head.npz)."""
    from mltag.data.formats import HEAD_FILE, check_same_labels, read_head_labels

    trained = read_head_labels(folder)
    if trained is not None:
        check_same_labels(trained, labels, Path(folder) / "model.json", "model.json",
                          f"the head in {HEAD_FILE} was trained on {', '.join(trained[:6])}"
                          f"{', ...' if len(trained) > 6 else ''}: the folder was edited; restore it or train again")


def load_head(folder: str | os.PathLike, labels: list[str]) -> NumpyHead | None:
    """A folder's ``head.npz`` as a ``NumpyHead``, its output width checked against ``labels``; None
    for a folder from before ``head.npz``."""
    from mltag.data.formats import HEAD_FILE, read_head

    weights = read_head(folder)
    if weights is None:
        return None
    check_output_width(labels, weights[-1].shape[0], Path(folder) / HEAD_FILE)
    check_head_labels(folder, labels)
    return NumpyHead.from_weights(weights)


def _keras_head_scores(model_dir, labels: list[str], features: np.ndarray) -> np.ndarray:
    import_tensorflow()  # keras' TF backend: without its start-up noise
    import keras

    f = Path(model_dir) / "head.keras"
    model = keras.saving.load_model(f, compile=False)
    check_output_width(labels, model.output_shape[-1], f)
    return predict_head(model, features)
