"""Entry point kept at the top level: the components live in ``mltag.kubeflow.components``."""

from mltag.kubeflow.components import (  # noqa: F401
    bottleneck,
    bottleneck_shard,
    calibrate,
    evaluate,
    prepare,
    register,
    shard_indices,
    train,
)
