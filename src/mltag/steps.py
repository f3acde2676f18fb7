"""The one entry every runner uses: ``mltag <step>`` (and so ``dvc repro``) and the Kubeflow components.

A step's parameters come from its typed config sections (``mltag.config``) by keyword;
the runner adds only paths and runtime settings (tracking URI, progress bars, shards).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

from mltag.config import Params, step_config, step_kwargs

STEP_FUNCTIONS = {
    "demo-data": "mltag.demo:make_demo_data",
    "prepare": "mltag.prepare:prepare",
    "bottleneck": "mltag.bottleneck:bottleneck",
    "train": "mltag.train:train",
    "evaluate": "mltag.evaluate:evaluate",
    "calibrate": "mltag.calibrate:calibrate",
    "register": "mltag.register:register",
    "review": "mltag.review:review",
}


def step_function(step: str) -> Callable:
    module, name = STEP_FUNCTIONS[step].split(":")
    return getattr(importlib.import_module(module), name)


def run_step(step: str, params: Params, **runtime):
    """Run ``step`` with its config from ``params`` plus ``runtime`` (paths, tracking URI, progress...).

    The resolved config goes to the step as ``config`` when it takes one: it is saved
    beside the step's outputs and logged to MLflow by the steps that log.
    """
    fn = step_function(step)
    kwargs = {**step_kwargs(step, params), **runtime}
    if "config" in inspect.signature(fn).parameters:
        kwargs["config"] = step_config(step, params) if step != "train" else _train_config(params)
    return fn(**kwargs)


def _train_config(params: Params) -> dict:
    """train's run is the model's MLflow run: it records every section, so the run is the whole recipe."""
    return params.to_dict()
