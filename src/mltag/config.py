"""One typed config per params.yaml section: every parameter is declared here, once.

params.yaml, the CLI flags (``mltag <step> --section.key`` or ``--key``), the step
functions' keyword arguments and the Kubeflow pipeline's parameters (one dict per
section) are all derived from these dataclasses; ``tests/test_config.py`` fails when
one of those views misses a key.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

from mltag.common import MltagError


def opt(default, help: str, choices: tuple | None = None):
    """A config field: its default, one line of help, and the allowed values when it is a choice."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Demo:
    n_images: int = opt(400, "built-in demo scenes (desert, mountains, sea, sunset, trees)")
    seed: int = opt(7, "demo data seed")


@dataclass(frozen=True)
class Prepare:
    input: str = opt("data/demo", "your dataset folder or file (see README: formats)")
    format: str = opt("auto", "input format", ("auto", "lst", "labels_json", "image_list", "folders", "csv"))
    val_fraction: float = opt(0.15, "validation fraction")
    test_fraction: float = opt(0.15, "test fraction")
    no_label: str = opt("keep", "images without labels: kept as all-negative, or rejected", ("keep", "reject"))
    max_bad_fraction: float = opt(0.05, "fail when more images than this are unusable")
    max_pixels: int = opt(40_000_000, "decompression-bomb cap")
    salt: str = opt("mltag", "split hash salt: changing it reshuffles every split")
    follow_symlinks: bool = opt(False, "accept images that are symlinks to files outside the image root")


@dataclass(frozen=True)
class Backbone:
    handle: str = opt("builtin:efficientnet_lite2",
                      "builtin:efficientnet_lite0/1/2, a TF Hub URL or a local SavedModel folder")
    image_size: int = opt(0, "input size; 0: the built-in's own (224/240/260), 224 for other modules")
    cache_dir: str = opt("", "where built-in backbones are built and converted; empty: the per-user cache "
                         "($MLTAG_BACKBONE_CACHE, else $XDG_CACHE_HOME/mltag/backbones, else "
                         "~/.cache/mltag/backbones)")


@dataclass(frozen=True)
class Bottleneck:
    batch_size: int = opt(32, "images per TF batch and per decode task (LiteRT runs one image per invoke "
                          "whatever it is)")
    cache_dir: str = opt(".mltag-cache/bottlenecks", "the vector store, content-addressed: a folder, or an fsspec "
                         "URI (s3://, gs://); on Kubeflow an absolute path (a PVC) or URI is shared by all runs")
    num_shards: int = opt(1, "Kubeflow: bottleneck shards computed in parallel")
    engine: str = opt("auto", "auto (LiteRT on CPU, TF when a GPU is visible), litert or tf", ("auto", "litert", "tf"))
    views: int = opt(4, "vectors per training image: the plain one + views-1 augmented (crop, flip, colour)")


@dataclass(frozen=True)
class Train:
    learning_rate: float = opt(0.001, "Adam learning rate of the head")
    epochs: int = opt(200, "maximum epochs of the head")
    batch_size: int = opt(32, "batch size")
    hidden_units: int = opt(0, "0: logistic head; >0: one ReLU hidden layer")
    dropout: float = opt(0.2, "dropout rate")
    patience: int = opt(15, "early-stopping patience (epochs)")
    monitor: str = opt("val_loss", "early-stopping metric", ("val_loss", "val_map"))
    seed: int = opt(42, "random seed")
    mode: str = opt("head", "head (on cached vectors) or fine_tune (also the backbone's top blocks, from the images)",
                    ("head", "fine_tune"))
    fine_tune_blocks: int = opt(2, "fine_tune: top blocks trained (the rest stays frozen); built-in backbones only")
    fine_tune_epochs: int = opt(10, "fine_tune: maximum epochs")
    fine_tune_learning_rate: float = opt(2e-5, "fine_tune: backbone learning rate; the head gets 10x this")
    fine_tune_patience: int = opt(3, "fine_tune: epochs without a better val loss before stopping")
    mixed_precision: str = opt("auto", "auto (float16 on a GPU), true or false", ("auto", "true", "false"))


@dataclass(frozen=True)
class Evaluate:
    bootstrap: int = opt(1000, "bootstrap resamples for 95% confidence intervals")
    seed: int = opt(0, "bootstrap seed")
    tta: str = opt("none", "test-time augmentation (10 crops/mirrors), end to end", ("none", "mean", "max"))


@dataclass(frozen=True)
class Calibrate:
    method: str = opt("f1", "f1, min_precision, or none (0.5 for every label)", ("f1", "min_precision", "none"))
    min_precision: float | None = opt(None, "precision target for method min_precision, e.g. 0.9")
    min_positives: int = opt(5, "labels with fewer positives get the global threshold")
    cv_folds: int = opt(5, "thresholds from out-of-fold scores over train+val (k head refits); 0: validation only")
    shrink: float = opt(10.0, "pseudo-positives pulling each label's threshold toward the global one")
    min_gain: float = opt(0.01, "out-of-fold F1 gain a label (and the whole set) needs to leave 0.5")


@dataclass(frozen=True)
class Review:
    filter_by: str = opt("prune_by_noise_rate", "cleanlab's rule for flagging an (image, label) pair",
                         ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given"))
    thumbnails: int = opt(24, "review.html: the most likely errors shown per label")


@dataclass(frozen=True)
class Tracking:
    experiment: str = opt("mltag", "MLflow experiment of the training runs")


@dataclass(frozen=True)
class Register:
    model_name: str = opt("mltag", "registered model name")
    margin: float = opt(0.0, "the challenger's test mAP must beat the champion's by more than this")
    max_label_ap_drop: float = opt(0.05, "largest per-label AP drop allowed against the champion")
    tflite: bool = opt(True, "also register model.tflite, and a quantized model_int8.tflite when it keeps the "
                       "accuracy, with a parity table")
    int8_images: int = opt(300, "training images that calibrate the int8 model's activation ranges")
    int8_max_drop: float = opt(0.01, "largest test mAP or micro F1 drop against fp32 that a quantized model may "
                               "have and still ship (full int8 first, then dynamic range)")


@dataclass(frozen=True)
class Pipeline:
    accelerator_type: str = opt("nvidia.com/gpu", "Kubernetes accelerator resource of GPU tasks")
    gpu_count: int = opt(1, "GPUs per GPU task")
    gpu_node_label_key: str = opt("cloud.google.com/gke-accelerator", "the GPU node pool's label key")
    gpu_node_label_value: str = opt("nvidia-tesla-t4", "the GPU node pool's label value")
    mlflow_secret: str = opt("mlflow-tracking", "Kubernetes secret with MLFLOW_TRACKING_URI (optional)")
    parallelism: int = opt(4, "bottleneck shards computed at once")
    gpu_image: str = opt("", "image for GPU steps (a CUDA build); empty: the same image as the CPU steps")
    bottleneck_on_gpu: bool = opt(False, "bottleneck shards on the GPU pool (with bottleneck.engine tf)")
    allow_cpu: bool = opt(False, "a GPU step that finds no GPU fails fast unless this is true")
    store_pvc: str = opt("", "PersistentVolumeClaim mounted at bottleneck.cache_dir (an absolute path) on every task "
                         "that reads or writes the vector store; empty: a bucket URI or pod-local store")
    collect_shards: bool = opt(True, "gather the shards' artifacts with dsl.Collected (KFP backend 2.5+); false: "
                               "the gather waits for the shard loop and reads the shared vector store only")


@dataclass(frozen=True)
class Params:
    demo: Demo = field(default_factory=Demo)
    prepare: Prepare = field(default_factory=Prepare)
    backbone: Backbone = field(default_factory=Backbone)
    bottleneck: Bottleneck = field(default_factory=Bottleneck)
    train: Train = field(default_factory=Train)
    evaluate: Evaluate = field(default_factory=Evaluate)
    calibrate: Calibrate = field(default_factory=Calibrate)
    review: Review = field(default_factory=Review)
    tracking: Tracking = field(default_factory=Tracking)
    register: Register = field(default_factory=Register)
    pipeline: Pipeline = field(default_factory=Pipeline)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section(self, name: str):
        return getattr(self, name)

    def replace(self, section: str, **values) -> Params:
        """A copy with some keys of one section changed (checked like params.yaml values)."""
        return dataclasses.replace(self, **{section: build_section(section, values, "", getattr(self, section))})


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Params)}

# The sections each step reads, its own first. Kubeflow runs every step but demo-data;
# the pipeline section is placement, fixed when the pipeline is compiled.
STEP_SECTIONS: dict[str, tuple[str, ...]] = {
    "demo-data": ("demo",),
    "prepare": ("prepare",),
    "bottleneck": ("bottleneck", "backbone"),
    "train": ("train", "backbone", "tracking"),
    "evaluate": ("evaluate",),
    "calibrate": ("calibrate",),
    "register": ("register", "tracking"),
    "review": ("review",),
}


def section_fields(section: str) -> list[dataclasses.Field]:
    return list(fields(SECTIONS[section]))


# Key names that more than one section has (cache_dir, seed, batch_size).
_SHARED_KEYS = {name for name, n in Counter(f.name for s in SECTIONS for f in section_fields(s)).items() if n > 1}


def coerce(cls: type, key: str, value, where: str):
    """``value`` as the declared type of ``cls.key``, or an error naming ``where``."""
    f = {x.name: x for x in fields(cls)}[key]
    typ = str(f.type)
    optional = "None" in typ
    base = typ.replace("| None", "").strip()
    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~") and optional):
        if optional:
            return None
        raise MltagError(f"{where} must be a {base}, not empty")
    if base == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            value = value.strip().lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise MltagError(f"{where} must be true or false, got {value!r}")
    elif base in ("int", "float"):
        value = _number(value, int if base == "int" else float, where)
    elif base == "str":
        choices = f.metadata.get("choices") or ()
        if isinstance(value, bool) and str(value).lower() in choices:  # YAML reads `true` as a bool
            value = str(value).lower()
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise MltagError(f"{where} must be text, got {value!r}")
        value = str(value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise MltagError(f"{where} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _number(value, cast: type, where: str):
    """``value`` as an int or float: numbers and numeric text; an int also from a whole float (KFP's)."""
    what = "an integer" if cast is int else "a number"
    if isinstance(value, str):
        try:
            value = cast(value)
        except ValueError:
            raise MltagError(f"{where} must be {what}, got {value!r}") from None
    if cast is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    allowed = (int,) if cast is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise MltagError(f"{where} must be {what}, got {value!r}")
    return cast(value)


def build_section(section: str, values: dict, where: str, base=None):
    """A section's config from ``values`` over ``base`` (default: the built-in defaults); unknown keys fail.

    ``where`` (a file, or what set the values) starts each error message when given.
    """
    cls = SECTIONS[section]
    at = f"{where}: " if where else ""
    if not isinstance(values, dict):
        raise MltagError(f"{at}section {section!r} must be a mapping of keys to values")
    known = [f.name for f in fields(cls)]
    for key in values:
        if key not in known:
            raise MltagError(f"{at}unknown key {section}.{key} (known: {', '.join(known)})")
    cur = base if base is not None else cls()
    return dataclasses.replace(cur, **{k: coerce(cls, k, v, f"{at}{section}.{k}") for k, v in values.items()})


def params_from_dict(data: dict, where: str, base: Params | None = None) -> Params:
    """Params from nested ``{section: {key: value}}``; sections of other tools are ignored."""
    p = base or Params()
    for section, values in data.items():
        if section in SECTIONS:
            p = dataclasses.replace(p, **{section: build_section(section, values, where, getattr(p, section))})
    return p


def load_params(path: str | os.PathLike | None = None) -> Params:
    """The defaults overlaid with ``path`` (default ``./params.yaml`` when it exists), strictly checked."""
    import yaml

    if path is None:
        path = Path("params.yaml")
        if not path.is_file():
            return Params()
    path = Path(path)
    if not path.is_file():
        raise MltagError("params file not found", path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise MltagError(f"invalid YAML: {getattr(e, 'problem', e)}", path, mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise MltagError("expected a mapping of sections", path)
    return params_from_dict(data, str(path))


def step_kwargs(step: str, params: Params) -> dict:
    """The step function's keyword arguments from the sections it reads.

    A key of the step's own section keeps its name; so does a key of another section,
    unless some other section has a key of that name too (``cache_dir``, ``seed``), then
    it is ``<section>_<key>`` (``backbone_cache_dir``).
    """
    out = {}
    for i, section in enumerate(STEP_SECTIONS[step]):
        cfg = getattr(params, section)
        for f in fields(cfg):
            out[f"{section}_{f.name}" if i > 0 and f.name in _SHARED_KEYS else f.name] = getattr(cfg, f.name)
    return out


def step_config(step: str, params: Params) -> dict:
    """The resolved values a step ran with, by section: saved beside its outputs and logged to MLflow."""
    return {s: dataclasses.asdict(getattr(params, s)) for s in STEP_SECTIONS[step]}
