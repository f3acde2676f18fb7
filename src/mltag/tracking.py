"""MLflow plumbing: where tracking goes, and the run that train opens and later steps join."""

from __future__ import annotations

import json
import os
from pathlib import Path


def tracking_uri(explicit: str | None = None) -> str:
    """``explicit`` > ``$MLFLOW_TRACKING_URI`` > ``sqlite:///<cwd>/mlflow.db`` (the embedded default)."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


_registry_set_here: str | None = None

# MLflow's own defaults retry a dead server for minutes (7 retries, backoff, 120 s timeout)
# before it says anything. mltag checks the server first and keeps MLflow's retries short;
# set these variables yourself to override.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
PROBE_TIMEOUT_S = 5.0


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail within ``timeout`` seconds when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    from mltag.common import MltagError

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy's 401/403/404 is still a live server)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise MltagError(f"MLflow tracking server {uri} does not answer ({reason}). Start it or point "
                         "MLFLOW_TRACKING_URI (or --tracking-uri) at a live one; nothing computed so far is "
                         "lost, and rerunning this step alone finishes the job") from None


def setup_checked(explicit: str | None = None) -> str:
    """``setup`` plus a short reachability check of an http(s) server, for steps that must reach it."""
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    uri = setup(explicit)
    check_reachable(uri)
    return uri


def setup(explicit: str | None = None) -> str:
    """Point mlflow at the tracking store; called by steps, never at import time."""
    import mlflow

    global _registry_set_here
    uri = tracking_uri(explicit)
    mlflow.set_tracking_uri(uri)
    # mlflow.set_registry_uri also exports MLFLOW_REGISTRY_URI (for subprocesses), so a value we set
    # for an earlier store must not be mistaken for the user's choice by a later call in this process.
    env = os.environ.get("MLFLOW_REGISTRY_URI")
    if env and env != _registry_set_here:
        return uri  # the user's own registry
    if uri.startswith("sqlite:"):
        mlflow.set_registry_uri(uri)
        _registry_set_here = uri
    elif _registry_set_here:
        from mlflow.tracking._model_registry import utils as registry_utils

        os.environ.pop("MLFLOW_REGISTRY_URI", None)
        registry_utils._registry_uri = None  # a server's registry is its tracking URI
        _registry_set_here = None
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
