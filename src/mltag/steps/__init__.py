"""The one entry every runner uses: ``mltag <step>`` (and so ``dvc repro``) and the Kubeflow components.

A step function takes its paths, its typed params sections (``mltag.config``) by section
name, and runtime settings (tracking URI, progress bars, a shard); it has no default for
any params key.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

from mltag.config import Params, step_config, step_sections

STEP_FUNCTIONS = {
    "demo-data": "mltag.data.demo:make_demo_data",
    "prepare": "mltag.steps.prepare:prepare",
    "bottleneck": "mltag.steps.bottleneck:bottleneck",
    "train": "mltag.steps.train:train",
    "evaluate": "mltag.steps.evaluate:evaluate",
    "calibrate": "mltag.steps.calibrate:calibrate",
    "register": "mltag.steps.register:register",
    "review": "mltag.steps.review:review",
}


OUTPUT_ARGS = ("out", "metrics", "metrics_file", "history_file", "oof_out", "card", "report")


def step_function(step: str) -> Callable:
    module, name = STEP_FUNCTIONS[step].split(":")
    return getattr(importlib.import_module(module), name)


def run_step(step: str, params: Params, **runtime):
    """Run ``step`` with its sections from ``params`` plus ``runtime`` (paths, tracking URI, progress...).

    The output-changing values (``config.step_config``) go to the step as ``config`` when it
    takes one: they are recorded in the step's outputs and logged to MLflow. train also gets
    every section as ``recipe``: its MLflow run is the model's, and records the whole recipe.
    """
    fn = step_function(step)
    from mltag.files import replaceable

    for key in OUTPUT_ARGS:  # refused before any work, not after it (the write itself checks again)
        if runtime.get(key):
            replaceable(runtime[key])
    kwargs = {**step_sections(step, params), **runtime}
    accepted = inspect.signature(fn).parameters
    if "config" in accepted:
        kwargs["config"] = step_config(step, params)
    if "recipe" in accepted:
        kwargs["recipe"] = params.to_dict()
    return fn(**kwargs)
