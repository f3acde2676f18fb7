"""params.yaml -> CLI defaults. Flags override; the resolved config is logged and saved by train."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from mltag.common import MltagError

DEFAULTS: dict = {
    "demo": {"n_images": 400, "seed": 7},
    "prepare": {"input": "data/demo", "format": "auto", "val_fraction": 0.15, "test_fraction": 0.15,
                "no_label": "keep", "max_bad_fraction": 0.05, "max_pixels": 40_000_000, "salt": "mltag"},
    "backbone": {"handle": "builtin:efficientnet_lite2", "image_size": 0, "cache_dir": ".mltag-cache/backbones"},
    "bottleneck": {"batch_size": 32, "cache_dir": ".mltag-cache/bottlenecks", "num_shards": 1, "engine": "auto",
                   "views": 4},
    "train": {"learning_rate": 0.001, "epochs": 200, "batch_size": 32, "hidden_units": 0, "dropout": 0.2,
              "patience": 15, "monitor": "val_loss", "seed": 42, "mode": "head", "fine_tune_blocks": 2,
              "fine_tune_epochs": 10, "fine_tune_learning_rate": 2e-5, "fine_tune_patience": 3,
              "mixed_precision": "auto"},
    "evaluate": {"bootstrap": 1000, "seed": 0, "tta": "none"},
    "calibrate": {"method": "f1", "min_precision": None, "min_positives": 5, "cv_folds": 5, "shrink": 10.0,
                  "min_gain": 0.01},
    "register": {"model_name": "mltag", "experiment": "mltag", "margin": 0.0, "max_label_ap_drop": 0.05,
                 "tflite": True},
    "pipeline": {"accelerator_type": "nvidia.com/gpu", "gpu_count": 1,
                 "gpu_node_label_key": "cloud.google.com/gke-accelerator",
                 "gpu_node_label_value": "nvidia-tesla-t4", "mlflow_secret": "mlflow-tracking", "parallelism": 4,
                 "gpu_image": "", "bottleneck_on_gpu": False, "allow_cpu": False},
}


def load_params(path: str | os.PathLike | None = None) -> dict:
    """DEFAULTS overlaid with ``path`` (default ``./params.yaml`` when it exists)."""
    import yaml

    params = copy.deepcopy(DEFAULTS)
    if path is None:
        path = Path("params.yaml")
        if not path.is_file():
            return params
    path = Path(path)
    if not path.is_file():
        raise MltagError("params file not found", path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise MltagError(f"invalid YAML: {getattr(e, 'problem', e)}", path, mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise MltagError("expected a mapping of sections", path)
    for section, values in data.items():
        if section not in params:
            continue  # other tools' sections are allowed
        if not isinstance(values, dict):
            raise MltagError(f"section {section!r} must be a mapping", path)
        for key, value in values.items():
            if key not in params[section]:
                raise MltagError(f"unknown key {section}.{key} (known: {', '.join(params[section])})", path)
            params[section][key] = value
    return params
