"""One typed, validated model per params.yaml section: every parameter is declared here, once.

The sections are pydantic models. params.yaml, the CLI flags (``mltag <step> --section.key``
or ``--key``), the step functions' section arguments, dvc.yaml's per-stage ``params:``, the
JSON Schema of params.yaml (``mltag params schema``), the docs' parameter reference (docs/configuration.md)
(``mltag params reference``) and the Kubeflow pipeline's parameters (one dict per section)
all come from these classes; ``tests/unit/test_config.py`` fails when one of those views
drifts. No step module holds a default or a list of allowed values of its own.

Each key says whether it changes its step's output (``changes_output``). Those keys, and
only those, are the step's dvc.yaml ``params:`` and the config recorded in its outputs;
the others (where the vector store lives, how many shards, which engine computes the
same vectors) only change where or how fast the work is done.
"""

from __future__ import annotations

import json
import os
import typing
import warnings
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from mltag.errors import MltagError


def opt(default, help: str, *, output: bool = True, **bounds):
    """A config key: its default, one line of help, whether it changes the step's output, and
    its bounds (``ge``, ``gt``, ``le``, ``lt``). Allowed values of a choice are its ``Literal`` type."""
    if isinstance(default, float) and not isinstance(default, bool):
        bounds.setdefault("allow_inf_nan", False)  # .inf or .nan in params.yaml is an error, not a setting
    return Field(default, description=help, json_schema_extra={"changes_output": output}, **bounds)


_NULLS = ("null", "none", "~", "")


class Section(BaseModel):
    """A params.yaml section: unknown keys are errors, values are read leniently from text
    (CLI flags, ``dvc exp run -S``) and from whole floats (KFP), and the object is frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=False)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data):
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key, value in data.items():
            f = cls.model_fields.get(key)
            if f is None:
                continue
            base, optional = _base_type(f.annotation)
            if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NULLS)):
                out[key] = None
            elif base is str or typing.get_origin(base) is Literal:
                if isinstance(value, os.PathLike):  # a path given from Python
                    out[key] = os.fspath(value)
                elif isinstance(value, bool):  # YAML reads `true` as a bool
                    out[key] = str(value).lower()
                elif isinstance(value, (int, float)):
                    out[key] = str(value)
            elif base in (int, float) and isinstance(value, bool):
                out[key] = str(value).lower()  # a bool is not a number: fails with the value named
            elif base is bool and isinstance(value, str):
                out[key] = value.strip().lower()
        return out


def _base_type(annotation) -> tuple[object, bool]:
    """``(T, optional)`` for ``T`` or ``T | None``."""
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


class Demo(Section):
    n_images: int = opt(400, "built-in demo scenes (desert, mountains, sea, sunset, trees)", ge=1)
    seed: int = opt(7, "demo data seed")


class Prepare(Section):
    input: str = opt("data/demo", "your dataset folder or file (see docs/data.md: formats)")
    format: Literal["auto", "lst", "labels_json", "image_list", "folders", "csv"] = opt("auto", "input format")
    val_fraction: float = opt(0.15, "validation fraction", ge=0, lt=1)
    test_fraction: float = opt(0.15, "test fraction", ge=0, lt=1)
    no_label: Literal["keep", "reject"] = opt("keep", "images without labels: kept as all-negative, or rejected")
    max_bad_fraction: float = opt(0.05, "fail when more images than this are unusable", output=False, ge=0, le=1)
    max_pixels: int = opt(40_000_000, "decompression-bomb cap", ge=1)
    salt: str = opt("mltag", "split hash salt: changing it reshuffles every split")
    follow_symlinks: bool = opt(False, "accept images that are symlinks to files outside the image root")
    label_groups: str = opt("auto", "exclusive label groups, labels of which every image has exactly one (colour in "
                            "colour + item data, the classes of single-label data), each predicted as its "
                            "top-scoring label: auto (found in the train+val labels), none, or declared as "
                            "'red,green,blue; dress,shoe' (labels by commas, groups by semicolons; a group after "
                            "'at most one:' may also be absent)")

    @model_validator(mode="after")
    def _fractions(self):
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(f"prepare.val_fraction + prepare.test_fraction must leave at least 10% of the images "
                             f"to train on, got {self.val_fraction} + {self.test_fraction}")
        return self


class Backbone(Section):
    handle: str = opt("builtin:efficientnet_lite2_ms+colour",
                      "builtin:efficientnet_lite0/1/2, each also with _ms (two scales and two middle stages: "
                      "about 2.5x the single-scale bottleneck time), or built-ins joined by + (their vectors side "
                      "by side, e.g. builtin:efficientnet_lite0_ms+efficientnet_lite2_ms), each also with +colour "
                      "(16 colour-histogram numbers of the photo beside them), a TF Hub URL or a local SavedModel "
                      "folder")
    image_size: int = opt(0, "input size; 0: the built-in's own (224/240/260; _ms 280/300/325), 224 for other "
                          "modules", ge=0)
    cache_dir: str = opt("", "where built-in backbones are built and converted; empty: the per-user cache "
                         "($MLTAG_BACKBONE_CACHE, else $XDG_CACHE_HOME/mltag/backbones, else "
                         "~/.cache/mltag/backbones)", output=False)
    precision: Literal["fp32", "int8"] = opt(
        "fp32", "fp32, or int8: the vectors and the served model.tflite from a fully int8 LiteRT backbone (weights per "
        "channel, activations calibrated on crops of scikit-image's sample photos, so the same model whatever the "
        "data); its own keys in the vector store; needs engine litert and scikit-image; head mode only")


class Bottleneck(Section):
    batch_size: int = opt(32, "images per TF batch and per decode task (LiteRT runs one image per invoke "
                          "whatever it is)", output=False, ge=1)
    cache_dir: str = opt(".mltag-cache/bottlenecks", "the vector store, content-addressed: a folder, or an fsspec "
                         "URI (s3://, gs://); on Kubeflow an absolute path (a PVC) or URI is shared by all runs",
                         output=False)
    num_shards: int = opt(1, "Kubeflow: bottleneck shards computed in parallel", output=False, ge=1)
    engine: Literal["auto", "litert", "tf"] = opt(
        "auto", "auto (LiteRT on CPU, TF when a GPU is visible), litert or tf: the same vectors (the store's keys "
        "do not name the engine), at another speed", output=False)
    views: int = opt(4, "vectors per training image: the plain one + views-1 augmented (crop, flip, colour)", ge=1)


class Train(Section):
    learning_rate: float = opt(0.001, "Adam learning rate of the head", gt=0)
    epochs: int = opt(200, "maximum epochs of the head", ge=1)
    batch_size: int = opt(32, "batch size", ge=1)
    hidden_units: int = opt(0, "0: logistic head; >0: one ReLU hidden layer", ge=0)
    dropout: float = opt(0.2, "dropout rate", ge=0, lt=1)
    patience: int = opt(15, "early-stopping patience (epochs); 0: every epoch runs, the best is kept", ge=0)
    refit: bool = opt(True, "head mode: after early stopping picks the epoch count on val, fit the shipped head "
                            "afresh on train+val for that many epochs (calibrate then needs cv_folds >= 2)")
    monitor: Literal["val_loss", "val_map"] = opt("val_loss", "early-stopping and best-epoch metric, of the head "
                                                  "and of fine_tune")
    seed: int = opt(42, "random seed")
    loss: Literal["bce", "asl"] = opt("bce", "the head's training loss: bce (binary cross-entropy) or asl "
                                      "(asymmetric loss; asl_gamma_pos = asl_gamma_neg = 2 and asl_clip 0 is the "
                                      "focal loss); early stopping and val_loss always use BCE")
    asl_gamma_neg: float = opt(4.0, "loss asl: focusing exponent of the negatives (easy negatives weigh less)", ge=0)
    asl_gamma_pos: float = opt(0.0, "loss asl: focusing exponent of the positives", ge=0)
    asl_clip: float = opt(0.05, "loss asl: probability shift of the negatives (a negative under it costs nothing)",
                          ge=0, lt=1)
    label_smoothing: float = opt(0.0, "the head's targets pulled toward 0.5 by this much (0.1: 0.05 and 0.95)",
                                 ge=0, lt=1)
    label_trust: float = opt(0.0, "head: each training target moves this far toward the out-of-fold score of "
                             "5 heads fitted on the train split's other folds, so labels those heads confidently "
                             "contradict weigh less (0: every label trusted; val and test keep their labels)",
                             ge=0, le=1)
    mode: Literal["head", "fine_tune"] = opt(
        "head", "head (on cached vectors) or fine_tune (also the backbone's top blocks, from the images)")
    fine_tune_blocks: int = opt(2, "fine_tune: top blocks trained (the rest stays frozen); built-in backbones only",
                                ge=1)
    fine_tune_epochs: int = opt(10, "fine_tune: maximum epochs", ge=1)
    fine_tune_learning_rate: float = opt(1e-4, "fine_tune: backbone learning rate (its peak, with the cosine "
                                         "schedule); the head gets 10x this", gt=0)
    fine_tune_patience: int = opt(3, "fine_tune: epochs without a better train.monitor value before stopping; 0: "
                                  "every epoch runs", ge=0)
    fine_tune_lr_decay: float = opt(1.0, "fine_tune: each tuned block learns at this times the rate of the block "
                                    "above it (layer-wise decay; 1: one rate for all)", gt=0, le=1)
    fine_tune_schedule: Literal["constant", "cosine"] = opt(
        "cosine", "fine_tune: learning-rate schedule: cosine (warm-up over the first epoch, then cosine decay to 0 "
        "at fine_tune_epochs) or constant")
    fine_tune_bn: Literal["affine", "frozen"] = opt(
        "affine", "fine_tune: batch norm in the tuned blocks: affine (its scale and offset train; the moving "
        "statistics stay) or frozen (all of it stays)")
    mixed_precision: Literal["auto", "true", "false"] = opt("auto", "auto (float16 on a GPU), true or false")
    checkpoint_dir: str = opt(".mltag-cache/checkpoints", "fine_tune: where each epoch's checkpoint goes (a folder or "
                              "an fsspec URI), so that a rerun on the same inputs resumes after the last finished "
                              "epoch; on Kubeflow a relative path becomes checkpoints/ in the shared vector store; "
                              "empty: none", output=False)


class Evaluate(Section):
    bootstrap: int = opt(1000, "bootstrap resamples for 95% confidence intervals", ge=0)
    seed: int = opt(0, "bootstrap seed")
    tta: Literal["none", "mean", "max"] = opt("none", "test-time augmentation (10 crops/mirrors), end to end")
    saliency: bool = opt(True, "report.html: an occlusion-saliency overlay (where the model looked) on every image of "
                         "the worst-error gallery (26 forward passes each, up to 8 images per label)")


class Calibrate(Section):
    method: Literal["f1", "min_precision", "none"] = opt("f1", "f1, min_precision, or none (0.5 for every label)")
    min_precision: float | None = opt(None, "precision target for method min_precision, e.g. 0.9", gt=0, le=1)
    min_positives: int = opt(5, "labels with fewer positives get the global threshold", ge=0)
    cv_folds: int = opt(5, "thresholds from out-of-fold scores over train+val (k head refits); 0: validation only",
                        ge=0)
    shrink: float = opt(10.0, "pseudo-positives pulling each label's threshold toward the global one", ge=0)
    min_gain: float = opt(0.01, "out-of-fold F1 gain a label needs to leave 0.5 (each label on its own; all go back "
                          "only when together they lose more than this in micro F1)")
    at_least_one: Literal["auto", "true", "false"] = opt(
        "auto", "an image with no label at its thresholds gets its top-scoring one: auto when that raises micro F1 "
                "out of fold (never with method min_precision or none)")

    @model_validator(mode="after")
    def _precision_target(self):
        if self.method == "min_precision" and self.min_precision is None:
            raise ValueError("calibrate.method min_precision needs calibrate.min_precision (e.g. 0.9)")
        return self


class Review(Section):
    filter_by: Literal["prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                       "predicted_neq_given"] = opt("prune_by_noise_rate",
                                                    "cleanlab's rule for flagging an (image, label) pair")
    thumbnails: int = opt(24, "review.html: the most likely errors shown per label", ge=0)
    saliency: int = opt(4, "review.html: the most likely errors per label that get an occlusion-saliency overlay "
                        "(26 forward passes each; 0: none)", ge=0)


class Tracking(Section):
    experiment: str = opt("", "MLflow experiment of the training runs (where the run is filed, not what it "
                          "computes); empty: one per dataset, named as its registered model (mltag-demo, "
                          "mltag-<your dataset's folder>)", output=False)


class Register(Section):
    model_name: str = opt("", "registered model name; empty: mltag-<the dataset's folder name> (mltag-demo for the "
                          "demo), so that datasets with other labels never share a model")
    gate: Literal["paired", "point"] = opt(
        "paired", "how the challenger is compared with the champion on the same test images: paired (a paired "
        "bootstrap: promote only when better with register.confidence) or point (the two mAPs as numbers)")
    confidence: float = opt(0.95, "gate paired: how sure the challenger must be better (and a label worse by more "
                            "than max_label_ap_drop, to refuse it)", ge=0.5, lt=1)
    bootstrap: int = opt(1000, "gate paired: resamples of the test images", ge=100)
    margin: float = opt(0.0, "the challenger's test mAP must beat the champion's by more than this (above -1: a "
                        "margin of -1 or less lets every challenger through)", gt=-1, lt=1)
    max_label_ap_drop: float = opt(0.05, "largest per-label AP drop allowed against the champion (below 1: an AP "
                                   "cannot drop by 1 or more, so such a value switches the check off)", ge=0, lt=1)
    tflite: bool = opt(True, "also register model.tflite, and a quantized model_int8.tflite when it keeps the "
                       "accuracy, with a parity table")
    int8: Literal["dynamic_range", "full", "none"] = opt(
        "dynamic_range", "the quantized model_int8.tflite tried: dynamic_range (int8 weights, float activations), "
        "full (full int8 first, calibrated on training images, then dynamic range) or none; full int8 lost "
        "0.085-0.11 test mAP on every set measured, and its calibration is most of register's time")
    int8_images: int = opt(300, "register.int8 full: training images that calibrate the activation ranges", ge=1)
    int8_max_drop: float = opt(0.01, "largest test mAP or micro F1 drop against fp32 that a quantized model may "
                               "have and still ship", ge=0)
    experiments: Literal["decide", "register"] = opt(
        "decide", "under `dvc exp run`: decide (run the gate and write the decision, but create no registry version "
        "and move no alias: exploring never touches what users rely on; `dvc exp apply` then `dvc repro -f -s "
        "register` registers the one you chose) or register (every experiment becomes a version, as `dvc repro`)")


class Pipeline(Section):
    retries: int = opt(2, "tries more for a failed task (a preempted spot node, an evicted pod), with exponential "
                       "backoff; 0: none", output=False, ge=0, le=10)
    retry_backoff: int = opt(30, "seconds before a failed task's first retry; each next one waits twice as long",
                             output=False, ge=1)
    accelerator_type: str = opt("nvidia.com/gpu", "Kubernetes accelerator resource of GPU tasks", output=False)
    gpu_count: int = opt(1, "GPUs per GPU task", output=False, ge=0)
    gpu_node_label_key: str = opt("cloud.google.com/gke-accelerator", "the GPU node pool's label key", output=False)
    gpu_node_label_value: str = opt("nvidia-tesla-t4", "the GPU node pool's label value", output=False)
    mlflow_secret: str = opt("mlflow-tracking", "Kubernetes secret with MLFLOW_TRACKING_URI (optional)", output=False)
    parallelism: int = opt(4, "bottleneck shards computed at once", output=False, ge=1)
    gpu_image: str = opt("", "image for GPU steps (a CUDA build); empty: the same image as the CPU steps",
                         output=False)
    bottleneck_on_gpu: bool = opt(False, "bottleneck shards on the GPU pool (with bottleneck.engine tf)", output=False)
    allow_cpu: bool = opt(False, "a GPU step that finds no GPU fails fast unless this is true", output=False)
    store_pvc: str = opt("", "PersistentVolumeClaim mounted at bottleneck.cache_dir (an absolute path) on every task "
                         "that reads or writes the vector store; empty: a bucket URI or pod-local store", output=False)
    collect_shards: bool = opt(True, "gather the shards' artifacts with dsl.Collected (KFP backend 2.5+); false: "
                               "the gather waits for the shard loop and reads the shared vector store only",
                               output=False)


with warnings.catch_warnings():  # `register` shadows BaseModel.register (abc's), which nothing here calls
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class Params(BaseModel):
        """All of params.yaml: one typed section per step (and the pipeline's placement)."""

        model_config = ConfigDict(extra="forbid", frozen=True)

        demo: Demo = Field(default_factory=Demo)
        prepare: Prepare = Field(default_factory=Prepare)
        backbone: Backbone = Field(default_factory=Backbone)
        bottleneck: Bottleneck = Field(default_factory=Bottleneck)
        train: Train = Field(default_factory=Train)
        evaluate: Evaluate = Field(default_factory=Evaluate)
        calibrate: Calibrate = Field(default_factory=Calibrate)
        review: Review = Field(default_factory=Review)
        tracking: Tracking = Field(default_factory=Tracking)
        register: Register = Field(default_factory=Register)
        pipeline: Pipeline = Field(default_factory=Pipeline)

        def to_dict(self) -> dict:
            return self.model_dump()

        def replace(self, section: str, **values) -> Params:
            """A copy with some keys of one section changed (checked like params.yaml values)."""
            return self.model_copy(update={section: build_section(section, values, "", getattr(self, section))})


SECTIONS: dict[str, type[Section]] = {name: f.default_factory for name, f in Params.model_fields.items()}

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


def section_fields(section: str) -> dict[str, FieldInfo]:
    """A section's keys, in params.yaml order."""
    return dict(SECTIONS[section].model_fields)


def choices(section: str, key: str) -> tuple[str, ...]:
    """The allowed values of a choice key (its ``Literal`` type); empty for any other key."""
    base, _ = _base_type(section_fields(section)[key].annotation)
    return typing.get_args(base) if typing.get_origin(base) is Literal else ()


def changes_output(section: str, key: str) -> bool:
    return bool((section_fields(section)[key].json_schema_extra or {}).get("changes_output", True))


def output_keys(step: str) -> list[str]:
    """``section.key`` of every key that changes ``step``'s output: its dvc.yaml ``params:``,
    and what its outputs record (``step_config``)."""
    return [f"{s}.{k}" for s in STEP_SECTIONS[step] for k in section_fields(s) if changes_output(s, k)]


# Key names that more than one section has (cache_dir, seed, batch_size).
_SHARED_KEYS = {k for k in {k for s in SECTIONS for k in section_fields(s)}
                if sum(k in section_fields(s) for s in SECTIONS) > 1}

_MESSAGES = {
    "int_parsing": "must be an integer", "int_type": "must be an integer", "int_from_float": "must be an integer",
    "float_parsing": "must be a number", "float_type": "must be a number", "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false", "bool_type": "must be true or false",
    "string_type": "must be text",
}


def _message(section: str, err: dict, at: str) -> str:
    key = ".".join(str(x) for x in err["loc"])
    path = f"{section}.{key}" if key else section
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        return f"{at}unknown key {path} (known: {', '.join(section_fields(section))})"
    if kind == "literal_error":
        text = f"must be one of {', '.join(choices(section, key))}"
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        text = f"must be {op} {bound}"
    elif kind == "model_type" or kind == "dict_type":
        return f"{at}section {path!r} must be a mapping of keys to values"
    elif kind == "value_error":  # a rule across keys: its message names them
        return f"{at}{err['msg'].removeprefix('Value error, ')}"
    else:
        text = _MESSAGES.get(kind, err["msg"].lower())
    return f"{at}{path}: {text}, got {value!r}"


def build_section(section: str, values: dict, where: str, base: Section | None = None) -> Section:
    """A section from ``values`` over ``base`` (default: the declared defaults); unknown keys fail.

    ``where`` (a file, or what set the values) starts each error message when given; the
    message then names the key path: ``params.yaml: train.epochs: must be an integer, got 'many'``.
    """
    cls = SECTIONS[section]
    at = f"{where}: " if where else ""
    if not isinstance(values, dict):
        raise MltagError(f"{at}section {section!r} must be a mapping of keys to values")
    current = base.model_dump(exclude_unset=True) if base is not None else {}
    try:
        return cls.model_validate({**current, **values})
    except ValidationError as e:
        raise MltagError("; ".join(_message(section, err, at) for err in e.errors())) from None


def params_from_dict(data: dict, where: str, base: Params | None = None) -> Params:
    """Params from nested ``{section: {key: value}}``; sections of other tools are ignored."""
    import difflib

    for s in data:
        near = difflib.get_close_matches(str(s), list(SECTIONS), n=1, cutoff=0.75) if s not in SECTIONS else []
        if near:  # another tool's section keeps its own name; a misspelled one of ours would be ignored
            raise MltagError(f"{where}: unknown section {s!r} (did you mean {near[0]!r}?); its keys would be ignored")
    p = base or Params()
    update = {s: build_section(s, v, where, getattr(p, s)) for s, v in data.items() if s in SECTIONS}
    return p.model_copy(update=update)


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


def flag_names(step: str) -> list[str]:
    """The short CLI flag of each key a step reads (``--learning-rate``), in section order.

    A key of the step's own section keeps its name; so does a key of another section,
    unless some other section has a key of that name too (``cache_dir``, ``seed``), then
    it is ``<section>_<key>`` (``--backbone-cache-dir``).
    """
    return [f"{section}_{k}" if i > 0 and k in _SHARED_KEYS else k
            for i, section in enumerate(STEP_SECTIONS[step]) for k in section_fields(section)]


def step_sections(step: str, params: Params) -> dict[str, Section]:
    """The typed sections a step function takes, by section name (its keyword arguments)."""
    return {s: getattr(params, s) for s in STEP_SECTIONS[step]}


def sections(step: str, params: Params | None = None, **values) -> dict[str, Section]:
    """A step function's sections from Python: ``params`` (default: the declared defaults, the
    same as params.yaml's) with ``values`` set, named as the step's short flags
    (``learning_rate``, ``handle``, ``backbone_cache_dir``) and checked like params.yaml values::

        train(bottlenecks, out, **sections("train", learning_rate=0.01))
    """
    where = dict(zip(flag_names(step), ((s, k) for s in STEP_SECTIONS[step] for k in section_fields(s))))
    unknown = sorted(set(values) - set(where))
    if unknown:
        raise MltagError(f"step {step} reads no key {', '.join(unknown)} (known: {', '.join(where)})")
    given: dict[str, dict] = {}
    for name, v in values.items():
        section, key = where[name]
        given.setdefault(section, {})[key] = v
    return step_sections(step, params_from_dict(given, "", base=params))


def step_config(step: str, params: Params) -> dict:
    """The output-changing values a step ran with, by section: recorded in its outputs and logged to MLflow."""
    keys = set(output_keys(step))
    return {s: {k: v for k, v in getattr(params, s).model_dump().items() if f"{s}.{k}" in keys}
            for s in STEP_SECTIONS[step]}


def json_schema() -> dict:
    """A JSON Schema of params.yaml, for editors (``# yaml-language-server: $schema=...``)."""
    schema = Params.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "mltag params.yaml"
    return schema


def reference_markdown() -> str:
    """The parameter reference (docs/configuration.md): one table per section, generated from these classes."""
    lines = []
    for section in SECTIONS:
        lines += [f"**{section}**", "", "| key | default | changes output | what it does |", "|---|---|---|---|"]
        for key, f in section_fields(section).items():
            allowed = choices(section, key)
            help_ = f.description + (f" ({' / '.join(allowed)})" if allowed else "")
            lines.append(f"| `{key}` | `{json.dumps(f.default)}` | {'yes' if changes_output(section, key) else 'no'} "
                         f"| {help_.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


REFERENCE_MARKERS = ("<!-- params-reference:begin -->\n", "<!-- params-reference:end -->")


def write_reference(path: str | os.PathLike) -> None:
    """Replace the parameter reference between the markers of ``path`` with a fresh one (docs/configuration.md)."""
    from mltag.files import write_text_atomic

    text = Path(path).read_text(encoding="utf-8")
    begin, end = REFERENCE_MARKERS
    if begin not in text or end not in text:
        raise MltagError(f"no {begin.strip()} ... {end} markers", path)
    head, rest = text.split(begin, 1)
    write_text_atomic(path, head + begin + reference_markdown() + end + rest.split(end, 1)[1])


LABEL_FILE_SUFFIXES = (".csv", ".lst", ".json", ".txt", ".tsv")


def derived_model_name(source: str) -> str:
    """The registered model name for a dataset when ``register.model_name`` is empty: ``mltag-`` and the
    dataset's folder name (a label file's folder), lower case, so the demo and your photos never share a
    model: ``data/demo`` -> ``mltag-demo``, ``datasets/photos/labels.csv`` -> ``mltag-photos``."""
    import re
    from pathlib import PurePosixPath

    path = PurePosixPath(str(source).split("://", 1)[-1].rstrip("/") or "data")
    name = path.parent.name if path.suffix.lower() in LABEL_FILE_SUFFIXES else path.name
    return "mltag-" + (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "data")


def model_name(params: Params) -> str:
    """The registered model name that ``params`` gives: ``register.model_name``, else derived from
    ``prepare.input`` (what predict, suggest and metrics use by default, as register does)."""
    return params.register.model_name or derived_model_name(params.prepare.input)
