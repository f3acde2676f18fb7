"""Engines that run a frozen backbone (or a whole model) on uint8 pixels.

* ``litert``: the module converted once to a ``.tflite`` file and run by the LiteRT
  interpreter (``ai-edge-litert``) with XNNPACK. On 2 AVX2 cores it runs the built-in
  Lite0 2.7x faster than TF with a largest difference of 1e-5 (``benchmarks/bottleneck.py``).
* ``tf``: the SavedModel through TensorFlow; what a GPU wants.
* ``auto``: ``tf`` when a GPU is visible, ``litert`` otherwise.

Every engine maps ``uint8 [B, S, S, 3]`` to ``float32 [B, D]``; the ``/255`` scaling is
inside, so the pixels fed to either are exactly those ``mltag.data.images.load_image`` made.
A module that LiteRT cannot convert falls back to ``tf`` with one log line saying why.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from mltag import config
from mltag.errors import MltagError, TransientError
from mltag.files import atomic_path, lock_beside, locked
from mltag.tf_runtime import import_tensorflow, quiet_stderr
from mltag.workers import cpu_threads

log = logging.getLogger(__name__)

ENGINES = config.choices("bottleneck", "engine")  # declared in mltag.config
# Bumped when the converted graph changes (it is part of the .tflite file's name).
CONVERTER_VERSION = "1"


def gpu_missing_reason() -> str | None:
    """Why TensorFlow cannot use a GPU here, or None when it can. Skips importing TF when no NVIDIA device exists."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} hides every device"
    if not (Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir()):
        return "the node exposes no NVIDIA device (no /dev/nvidia0): check the GPU node pool and its device plugin"
    tf = import_tensorflow()

    if not tf.config.list_physical_devices("GPU"):
        return ("an NVIDIA device exists but TensorFlow cannot use it: the image is not the GPU build "
                "(set pipeline.gpu_image to a CUDA image of mltag, e.g. built FROM tensorflow/tensorflow:*-gpu)")
    return None


def gpu_visible() -> bool:
    """True when TensorFlow sees a GPU."""
    return gpu_missing_reason() is None


REQUIRE_GPU_ENV = "MLTAG_REQUIRE_GPU"


def require_gpu(step: str) -> None:
    """Fail fast when the pipeline placed ``step`` on a GPU node (``MLTAG_REQUIRE_GPU=1``) and there is none.

    Running on CPU there by accident would be silent and many times slower. The compiled
    pipeline sets the variable on GPU tasks unless ``pipeline.allow_cpu`` is true.
    """
    if os.environ.get(REQUIRE_GPU_ENV, "") != "1":
        return
    why = gpu_missing_reason()
    if why is not None:
        raise MltagError(f"{step}: this step was placed on the GPU pool but has no GPU: {why}. "
                         f"To run it on CPU anyway, compile with pipeline.allow_cpu: true (or unset {REQUIRE_GPU_ENV})")


def resolve_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise MltagError(f"bottleneck.engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "auto":
        return "tf" if gpu_visible() else "litert"
    return engine


class TFEngine:
    """A SavedModel feature-vector module (``float [0,1]`` in) run by TensorFlow."""

    name = "tf"

    def __init__(self, location: str):
        tf = import_tensorflow()

        from mltag.backbones.builtin import Backbone, load

        module = load(Backbone(location, location, ""))

        @tf.function(reduce_retracing=True)
        def run(images_uint8):
            return module(tf.cast(images_uint8, tf.float32) / 255.0)

        self._run = run

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self._run(pixels).numpy(), np.float32)


class LiteRTEngine:
    """A ``.tflite`` model (``uint8 [B,S,S,3]`` in) run by the LiteRT interpreter with XNNPACK.

    ``parallel`` interpreters of ``threads`` threads each. A call splits its batch between
    them (one image per invoke: 247 img/s for Lite0 at batch 1, 214 at batch 32). The
    default is one interpreter with a thread per core, the faster layout for a caller that
    waits for each batch.

    ``lanes()`` hands out one single-image runner per interpreter, for a caller that keeps
    each busy from its own thread (the bottleneck step, with one single-threaded interpreter
    per core): no lane ever waits for another, whereas the threads of one interpreter meet
    at the end of every layer, so a decode that preempts one of them stalls both.
    """

    name = "litert"

    def __init__(self, tflite_file: str | os.PathLike, threads: int | None = None, parallel: int | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise MltagError("engine litert needs the PyPI package 'ai-edge-litert'") from None
        if threads is None and parallel is None:
            threads, parallel = cpu_threads(), 1
        threads, parallel = threads or 1, parallel or 1
        # Several interpreters share one copy of the model in memory (13 MB less for Lite0's second
        # than mapping the file again); each still packs its own weights for XNNPACK.
        self._model = Path(tflite_file).read_bytes() if parallel > 1 else None
        with quiet_stderr():
            self._its = [Interpreter(model_content=self._model, num_threads=threads) if self._model else
                         Interpreter(model_path=str(tflite_file), num_threads=threads) for _ in range(parallel)]
        inp = self._its[0].get_input_details()[0]
        out = self._its[0].get_output_details()[0]
        self._in, self._out = inp["index"], out["index"]
        self.output_width = int(out["shape"][-1])  # what a loader checks the label list against
        self.input_shape = tuple(int(d) for d in inp["shape"][1:])
        self.input_dtype = inp["dtype"]
        self._batch = [None] * parallel
        self._pool = None
        if parallel > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(parallel, thread_name_prefix="mltag-litert")

    def _run_one(self, i: int, pixels: np.ndarray) -> np.ndarray:
        it = self._its[i]
        out = []
        for j in range(len(pixels)):
            if self._batch[i] != 1:
                it.resize_tensor_input(self._in, [1, *self.input_shape])
                with quiet_stderr():
                    it.allocate_tensors()
                self._batch[i] = 1
            it.set_tensor(self._in, np.ascontiguousarray(pixels[j: j + 1], dtype=self.input_dtype))
            it.invoke()  # releases the GIL: the interpreters run side by side
            out.append(it.get_tensor(self._out).copy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def lanes(self) -> list:
        """One runner per interpreter, ``uint8 [1,S,S,3] -> float32 [1,D]``. Each must be called
        from one thread at a time; different runners may run at once."""
        return [functools.partial(self._run_one, i) for i in range(len(self._its))]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels)
        if pixels.shape[1:] != self.input_shape:
            raise MltagError(f"engine expects images {self.input_shape}, got {pixels.shape[1:]}")
        if len(pixels) == 0:
            return np.zeros((0, 0), np.float32)
        n = len(self._its)
        if self._pool is None or len(pixels) == 1:
            return self._run_one(0, pixels).astype(np.float32)
        parts = np.array_split(np.arange(len(pixels)), n)
        futures = [self._pool.submit(self._run_one, i, pixels[idx]) for i, idx in enumerate(parts) if len(idx)]
        return np.concatenate([f.result() for f in futures]).astype(np.float32)


def tflite_path(backbone, image_size: int, backbone_cache: str | os.PathLike, kind: str = "fp32") -> Path:
    """Where the converted backbone lives: beside the built ones, keyed like them (and by kind)."""
    key = hashlib.sha256(f"{backbone.backbone_id}|{image_size}|{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    from mltag.backbones.builtin import cache_root

    return cache_root(backbone_cache) / "litert" / (f"{key}.tflite" if kind == "fp32" else f"{key}.{kind}.tflite")


def convert_backbone(location: str, image_size: int, out: str | os.PathLike, dynamic_range: bool = False,
                     representative: list[np.ndarray] | None = None) -> Path:
    """Convert a feature-vector SavedModel to ``.tflite`` (uint8 pixels in, the /255 inside), atomically.

    ``dynamic_range``: int8 weights, float activations (no calibration data). ``representative``
    (uint8 images ``[S,S,3]``): full int8, weights and activations calibrated on those images;
    the input stays uint8 pixels and the output float features either way.

    Raises:
        MltagError: the module cannot be converted (the message says why).
    """
    features, module = _features_function(location, image_size)
    data = _convert(features, module, "this module", dynamic_range, representative)
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    return out


@functools.lru_cache(maxsize=2)
def _features_function(location: str, image_size: int):
    """The module loaded and wrapped for conversion, once per process: a second conversion of the same
    backbone (its dynamic-range form after the fp32 one) reuses the load and the trace."""
    tf = import_tensorflow()

    from mltag.backbones.builtin import Backbone, load

    module = load(Backbone(location, location, ""))

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, name="images")])
    def features(images):
        return {"features": module(tf.cast(images, tf.float32) / 255.0)}

    return features, module


def _convert(fn, trackable, what: str, dynamic_range: bool = False,
             representative: list[np.ndarray] | None = None) -> bytes:
    """A ``tf.function`` with an input signature (and the object that holds its variables) as LiteRT
    flatbuffer bytes, quantized as ``convert_backbone`` says. Any converter failure is one
    ``MltagError`` saying why (``what`` names the model), its MLIR diagnostics kept off stderr."""
    tf = import_tensorflow()

    try:
        conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], trackable)
        if dynamic_range or representative is not None:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if representative is not None:
            conv.representative_dataset = lambda: ([np.asarray(px, np.uint8)[None]] for px in representative)
        with quiet_stderr():  # the converter dumps MLIR diagnostics; the exception says what matters
            return conv.convert()
    except (MemoryError, OSError) as e:  # this machine, this time: not the module's fault
        raise TransientError(f"LiteRT conversion of {what} ran out of {'memory' if isinstance(e, MemoryError) else 'room'}"
                             f" ({type(e).__name__}: {e}); free some and rerun") from None
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds; all mean "cannot convert"
        raise MltagError(f"LiteRT cannot convert {what} ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from None


def litert_backbone(backbone, image_size: int, backbone_cache: str | os.PathLike, kind: str = "fp32",
                    for_register: bool = True) -> Path:
    """The backbone's ``.tflite`` file, converted once per backbone, size and kind and kept in the backbone
    cache: ``fp32``, or ``dynamic_range`` (int8 weights, float activations). One process converts; the
    others wait for it. A module that cannot be converted is remembered (``.failed``), so a second
    attempt says why at once; a conversion that ran out of memory or disk (``TransientError``) is not.
    An fp32 conversion makes the dynamic-range form too (register's int8 model) unless ``for_register`` is
    false: the fp32 reference a full-int8 conversion is checked against, whose model register never quantizes.

    Raises:
        MltagError: the module cannot be converted (the message says why).
    """
    path = tflite_path(backbone, image_size, backbone_cache, kind)
    failed = path.with_suffix(".failed")
    if failed.is_file():  # converting again would fail again; say why once more
        raise MltagError(failed.read_text(encoding="utf-8").strip())
    if not path.is_file():
        _convert_once(backbone, image_size, kind, path, failed, backbone_cache)
        if kind == "fp32" and for_register and not _is_int8(backbone):
            # register quantizes the backbone (register.int8: dynamic_range): converted now, while the
            # module is loaded and TF imported, it costs the converter alone, not a TF start in register
            try:
                litert_backbone(backbone, image_size, backbone_cache, kind="dynamic_range")
            except MltagError as e:
                log.info("no dynamic-range conversion of %s (register's int8 model): %s", backbone.handle, e)
    return path


def _is_int8(backbone) -> bool:
    from mltag.backbones.builtin import precision_of

    return precision_of(backbone.backbone_id) == "int8"


SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "cat", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "camera", "moon", "brick", "grass", "gravel", "coins", "clock")


def int8_calibration_images(image_size: int, n: int = 200) -> list[np.ndarray]:
    """What calibrates a fully int8 backbone's activations: ``n`` crops (half to all of a side, some mirrored, seed 0)
    of scikit-image's 14 sample photos at ``image_size``. Real photos that are nobody's dataset, so the int8 model
    is a function of the backbone alone: on two real devsets over 5 splits each, as accurate as calibrating on the
    data's own training photos (benchmarks/README.md), and it never changes when images are added.

    Raises:
        MltagError: scikit-image is not installed.
    """
    try:
        from skimage import data
    except ImportError:
        raise MltagError("backbone.precision int8 calibrates on scikit-image's sample photos: pip install "
                         "scikit-image") from None
    from PIL import Image

    rng = np.random.default_rng(0)
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in SAMPLE_PHOTOS]
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        w, h = im.size
        f = rng.uniform(0.5, 1.0)
        cw, ch = int(w * f), int(h * f)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = im.crop((x, y, x + cw, y + ch)).resize((image_size, image_size), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(np.asarray(crop, np.uint8))
    return out


INT8_MIN_COSINE = 0.97  # the two-scale built-ins keep about 0.99 (flowers: 0.989), plain Lite0 0.74


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)))


def _convert_int8(backbone, image_size: int, path: Path, backbone_cache) -> None:
    """The full-int8 backbone, calibrated on 200 crops of the sample photos and kept only if faithful: on 32 other
    crops, the mean cosine of its vectors with the fp32 model's must reach ``INT8_MIN_COSINE``.

    Raises:
        MltagError: the conversion fails, or loses too much (the message says how much).
    """
    from mltag.backbones.builtin import INT8, Backbone, split_colour
    from mltag.backbones.colour import COLOUR, COLOUR_DIM

    photos = int8_calibration_images(image_size, 232)
    scratch = path.with_name(path.name + ".unchecked")
    try:
        convert_backbone(backbone.location, image_size, scratch, representative=photos[:200])
        plain = Backbone(backbone.handle, backbone.location, backbone.backbone_id.removesuffix(INT8))
        px = np.stack(photos[200:])
        a = LiteRTEngine(litert_backbone(plain, image_size, backbone_cache, for_register=False))(px)
        b = LiteRTEngine(scratch)(px)
        cos = _mean_cosine(a, b)
        if cos < INT8_MIN_COSINE:
            raise MltagError(f"backbone.precision int8: {backbone.handle} at {image_size} px converted to int8 keeps a "
                             f"mean cosine of {cos:.3f} with its fp32 vectors (under {INT8_MIN_COSINE}, on photos it "
                             "was not calibrated on): use precision fp32 for it (the two-scale built-ins, _ms, keep "
                             "about 0.99)")
        if split_colour(backbone.handle)[1]:  # 16 of 1,600 numbers: the whole vector's cosine hides them
            # centred (each number's mean over the photos taken away): the numbers are all positive, one large
            # (white), which alone keeps a plain cosine near 1 (0.98 with per-number correlations of 0.85)
            mean = a[:, -COLOUR_DIM:].mean(0)
            part = _mean_cosine(a[:, -COLOUR_DIM:] - mean, b[:, -COLOUR_DIM:] - mean)
            if part < INT8_MIN_COSINE:
                raise MltagError(f"backbone.precision int8: the colour part of {backbone.handle} keeps a mean cosine "
                                 f"of {part:.3f} with its fp32 numbers in int8 (under {INT8_MIN_COSINE}): use "
                                 f"precision fp32, or the handle without +{COLOUR}")
        log.info("int8 backbone: mean cosine %.4f with fp32 on photos it was not calibrated on", cos)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


def _convert_once(backbone, image_size: int, kind: str, path: Path, failed: Path, backbone_cache="") -> None:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # one process converts (a lock of its own: atomic_path takes the file's for the rename)
        with locked(lock_beside(f"{path}.build"), f"the LiteRT conversion {path}"):
            if failed.is_file():
                raise MltagError(failed.read_text(encoding="utf-8").strip())
            if not path.is_file():
                int8 = kind == "fp32" and _is_int8(backbone)
                log.info("converting backbone %s to LiteRT%s (once) -> %s", backbone.handle,
                         " (full int8)" if int8 else "" if kind == "fp32" else f" ({kind.replace('_', ' ')})", path)
                try:
                    if int8:
                        _convert_int8(backbone, image_size, path, backbone_cache)
                    else:
                        convert_backbone(backbone.location, image_size, path, dynamic_range=kind == "dynamic_range")
                except TransientError:  # out of memory or disk: the next run tries again
                    raise
                except MltagError as e:
                    with contextlib.suppress(OSError):
                        failed.write_text(f"{e}\n", encoding="utf-8")
                    raise


def litert_bottom(name: str, k: int, image_size: int, backbone_cache: str | os.PathLike | None = "") -> Path:
    """The frozen bottom of built-in ``name`` (stem and blocks ``[0, k)``, its package weights) as a
    ``.tflite`` file: uint8 pixels ``[B,S,S,3]`` in, the float32 feature map out. What fine-tuning
    runs once per view, converted once per backbone, ``k`` and size into the backbone cache.

    Raises:
        MltagError: the conversion failed (the message says why).
    """
    from mltag.backbones.builtin import builtin_id, cache_root

    key = hashlib.sha256(f"{builtin_id(name)}|bottom{k}|{image_size}|{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    path = cache_root(backbone_cache) / "litert" / f"{key}.bottom{k}.tflite"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(lock_beside(f"{path}.build"), f"the LiteRT conversion {path}"):
        if not path.is_file():
            tf = import_tensorflow()

            from mltag.backbones.builtin import LiteNet

            net = LiteNet(name)

            @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, name="images")])
            def maps(images):
                return {"maps": net.bottom(tf.cast(images, tf.float32) / 255.0, k)}

            log.info("converting the frozen blocks 0-%d of %s to LiteRT (once) -> %s", k - 1, name, path)
            root = tf.Module()
            root.weights = net.variables
            data = _convert(maps, root, "the frozen blocks")
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
    return path


def backbone_engine(engine: str, backbone, image_size: int, backbone_cache: str | os.PathLike,
                    threads: int | None = None, *, lanes: bool = False):
    """An engine for a resolved backbone: ``litert`` (converted once, cached) or ``tf``.

    With ``auto`` or ``litert``, a module LiteRT cannot convert or run falls back to
    ``tf`` with one warning line that says why; an int8 backbone (``backbone.precision``) never does, since TF
    would put float vectors under its keys. ``lanes`` asks LiteRT for one
    single-threaded interpreter per core (``LiteRTEngine.lanes``) instead of one
    interpreter with a thread per core.
    """
    chosen = resolve_engine(engine)
    int8 = _is_int8(backbone)
    if int8 and chosen != "litert":
        raise MltagError(f"backbone.precision int8 runs on LiteRT; bottleneck.engine is {engine!r} ({chosen} here): "
                         "set it to litert or auto on a machine without a GPU")
    if chosen == "litert":
        try:
            path = litert_backbone(backbone, image_size, backbone_cache)
            eng = LiteRTEngine(path, 1, cpu_threads()) if lanes else LiteRTEngine(path, threads)
            eng(np.zeros((1, image_size, image_size, 3), np.uint8))  # fail here, not mid-run
            return eng
        except (MltagError, ValueError, RuntimeError) as e:
            if int8:
                raise
            log.warning("engine litert unavailable for %s, using tf: %s", backbone.handle, e)
    return TFEngine(backbone.location)
