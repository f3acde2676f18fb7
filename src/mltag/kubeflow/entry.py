"""What a component body calls: the step's typed config from the pipeline's section dicts.

A section dict given to a run overrides the compiled defaults key by key, so
``train={"epochs": 50}`` changes one value and keeps the rest of the compiled params.yaml.
"""

from __future__ import annotations

import os

from mltag.common import MltagError
from mltag.config import STEP_SECTIONS, Params, params_from_dict


def params_for(step: str, given: dict, defaults: dict) -> Params:
    """The compiled ``defaults`` of ``step``'s sections overlaid with this run's ``given`` values.

    In a container the built backbones live where the image put them (``MLTAG_BACKBONE_CACHE``),
    whatever ``backbone.cache_dir`` says.
    """
    p = params_from_dict(defaults, "compiled params")
    extra = set(given) - set(STEP_SECTIONS[step])
    if extra:
        raise MltagError(f"step {step} does not read section(s) {', '.join(sorted(extra))}")
    p = params_from_dict({k: v or {} for k, v in given.items()}, f"pipeline parameters of {step}", base=p)
    if "backbone" in STEP_SECTIONS[step]:
        p = p.replace("backbone", cache_dir=os.environ.get("MLTAG_BACKBONE_CACHE", "/tmp/mltag-backbones"))
    return p


def check_fixed_mode(params: Params, defaults: dict) -> None:
    """train.mode decides GPU placement when compiling: a run may not change it."""
    compiled = defaults["train"]["mode"]
    if params.train.mode != compiled:
        raise MltagError(f"train.mode is {params.train.mode!r} but the pipeline was compiled for {compiled!r}, "
                         "which decides where the GPU goes; recompile with `mltag pipeline compile --params FILE`")
