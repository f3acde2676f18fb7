"""MLflow plumbing: where tracking goes, and the run that train opens and later steps join."""

from __future__ import annotations

import json
import os
from pathlib import Path


def tracking_uri(explicit: str | None = None) -> str:
    """``explicit`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db`` (the embedded default)."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def setup(explicit: str | None = None) -> str:
    """Point mlflow at the tracking store; called by steps, never at import time."""
    import mlflow

    uri = tracking_uri(explicit)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:") and not os.environ.get("MLFLOW_REGISTRY_URI"):
        mlflow.set_registry_uri(uri)
    return uri


def save_run_ref(folder: str | os.PathLike, run_id: str, experiment_id: str, uri: str) -> None:
    ref = {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri}
    (Path(folder) / "run.json").write_text(json.dumps(ref, indent=2) + "\n", encoding="utf-8")


def run_id_of(model_dir: str | os.PathLike) -> str | None:
    f = Path(model_dir) / "run.json"
    if not f.is_file():
        return None
    return json.loads(f.read_text(encoding="utf-8"))["run_id"]


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
