"""The colour part of a built-in backbone (``builtin:NAME+colour``): 16 numbers of the photo's colour beside the
network's vector, computed inside the module (so the vector store, LiteRT and the served model carry them)."""

from __future__ import annotations

import math

import numpy as np

from mltag.tf_runtime import import_tensorflow

# ``+colour`` (``builtin:efficientnet_lite2_ms+colour``): a part with no weights, joined to a network: a
# 16-number colour histogram of the photo's centre (12 hues weighted by chroma, 4 grey levels weighted by the
# lack of it). ImageNet features are trained to ignore colour shifts (colour jitter), so a label that *is* a
# colour ("grey", "purple") is what they serve worst; this block keeps it in the vector, in the served LiteRT
# model too.
COLOUR = "colour"
COLOUR_VERSION = "1"  # in the backbone id, so in every store key: bump it with any change to colour_vector
COLOUR_WEIGHT = 5.0  # its spread about a quarter of the network's vector's, as its 1280+ dimensions spread
COLOUR_DIM = 16


def colour_vector(images):
    """``COLOUR_DIM`` numbers per image (float images in [0, 1]): on the image at 64 x 64 with a centred Gaussian
    weight (sigma a third of the side), the chroma-weighted histogram of 12 hues (soft bins on the opponent-colour
    angle) and the greyness-weighted histogram of 4 brightness levels, over the weight's sum, square-rooted.
    Element-wise operations only, so it converts to LiteRT as it is."""
    tf = import_tensorflow()

    x = tf.image.resize(tf.cast(images, tf.float32), (64, 64), "bilinear")
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    a, o = r - 0.5 * (g + b), 0.8660254 * (g - b)  # the opponent plane: hue is the angle, chroma the length
    chroma = tf.sqrt(a * a + o * o + 1e-6)
    value = tf.maximum(tf.maximum(r, g), b)
    grey = 1.0 - tf.minimum(chroma / (value + 0.05), 1.0)
    yy, xx = np.mgrid[0:64, 0:64]
    centre = np.exp(-(((yy - 31.5) / 21.0) ** 2 + ((xx - 31.5) / 21.0) ** 2)).astype(np.float32)
    centre = tf.constant(centre / centre.sum())
    step = 1.0 - math.cos(2 * math.pi / 12)
    bins = []
    for k in range(12):
        cos_k = (a * math.cos(2 * math.pi * k / 12) + o * math.sin(2 * math.pi * k / 12)) / chroma
        bins.append(tf.reduce_sum(centre * chroma * tf.nn.relu(1.0 - (1.0 - cos_k) / step), axis=[1, 2]))
    for k in range(4):
        level = tf.nn.relu(1.0 - tf.abs(value - (k + 0.5) / 4) * 4)
        bins.append(tf.reduce_sum(centre * grey * level, axis=[1, 2]))
    return COLOUR_WEIGHT * tf.sqrt(tf.stack(bins, axis=1) + 1e-6)
