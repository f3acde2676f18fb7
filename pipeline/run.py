"""Compile, run locally (kfp.local) or submit the pipeline to a Kubeflow Pipelines endpoint."""

from __future__ import annotations

import os
from pathlib import Path

from mltag.common import MltagError
from pipeline.pipeline import REPO, build_pipeline

COMPILED = REPO / "pipeline" / "pipeline.yaml"


def compile_pipeline(out: str | os.PathLike = COMPILED, params: dict | None = None) -> Path:
    from kfp import compiler

    from mltag.common import atomic_path

    out = Path(out)
    with atomic_path(out) as tmp:
        compiler.Compiler().compile(build_pipeline(params), str(tmp))
    return out


def _arguments(data: str, data_repo: str, data_rev: str, tracking_uri: str | None, overrides: dict) -> dict:
    fn = build_pipeline()
    known = set(fn.component_spec.inputs or {})
    args = {"data": data, "data_repo": data_repo, "data_rev": data_rev}
    if tracking_uri:
        args["tracking_uri"] = tracking_uri
    for k, v in (overrides or {}).items():
        if k not in known:
            raise MltagError(f"unknown pipeline parameter {k!r}; known: {', '.join(sorted(known))}")
        args[k] = v
    types = {k: spec.type for k, spec in fn.component_spec.inputs.items()}
    for k, v in list(args.items()):
        if isinstance(v, str) and types.get(k) == "Integer":
            args[k] = int(v)
        elif isinstance(v, str) and types.get(k) == "Float":
            args[k] = float(v)
    return args


def run_local(data: str = "data/demo", data_repo: str = "", data_rev: str = "", pipeline_root: str | None = None,
              tracking_uri: str | None = None, overrides: dict | None = None):
    """Run the whole DAG on this machine with ``kfp.local.SubprocessRunner(use_venv=False)``.

    Every step runs in a subprocess with this Python (mltag installed), so the DAG,
    the ParallelFor fan-out and the artifact passing are the real ones.
    """
    from kfp import local

    from mltag import tracking

    if not data_repo:
        if not Path(data).exists() and Path(data) == Path("data/demo"):
            from mltag.demo import make_demo_data

            make_demo_data(data)  # the built-in demo data, as `dvc repro` would make it
        data = str(Path(data).resolve())
    uri = tracking.tracking_uri(tracking_uri)
    root = str(Path(pipeline_root or "local_outputs").resolve())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root)
    fn = build_pipeline()
    result = fn(**_arguments(data, data_repo, data_rev, uri, overrides))
    print(f"pipeline: local run finished; artifacts under {root}; MLflow at {uri}")
    return result


def submit(host: str, experiment: str = "mltag", data: str = "", data_repo: str = "", data_rev: str = "",
           tracking_uri: str | None = None, overrides: dict | None = None):
    """Submit a run of the compiled pipeline to a KFP endpoint."""
    import kfp

    args = _arguments(data, data_repo, data_rev, tracking_uri, overrides)
    compiled = compile_pipeline(Path(os.environ.get("TMPDIR", "/tmp")) / "mltag-pipeline.yaml")
    try:
        client = kfp.Client(host=host)
        run = client.create_run_from_pipeline_package(str(compiled), arguments=args, experiment_name=experiment)
    except Exception as e:  # noqa: BLE001 - connection and auth errors come in many types
        raise MltagError(f"cannot submit to {host}: {type(e).__name__}: {str(e)[:300]}") from None
    print(f"pipeline: submitted run {run.run_id} to {host} (experiment {experiment})")
    return run
