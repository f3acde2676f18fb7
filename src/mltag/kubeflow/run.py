"""Compile, run locally (kfp.local) or submit the pipeline to a Kubeflow Pipelines endpoint."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from mltag.common import MltagError
from mltag.config import Params, load_params, params_from_dict
from mltag.kubeflow.pipeline import PIPELINE_SECTIONS, build_pipeline, no_nulls

COMPILED = Path("pipeline") / "pipeline.yaml"


def compile_pipeline(out: str | os.PathLike = COMPILED, params: Params | None = None) -> Path:
    """Compile with the defaults and placement of ``params`` (default: ./params.yaml when present)."""
    from kfp import compiler

    from mltag.common import atomic_path

    out = Path(out)
    with atomic_path(out) as tmp:
        compiler.Compiler().compile(build_pipeline(params or load_params(None)), str(tmp))
        tmp.write_text(_stable_header(tmp.read_text(encoding="utf-8")), encoding="utf-8")
    return out


def _stable_header(text: str) -> str:
    """KFP's header comment lists dict defaults in protobuf map order, which changes run to run: sort them."""
    import ast
    import re

    def fix(m):
        try:
            d = ast.literal_eval(m.group(2))
        except (ValueError, SyntaxError):
            return m.group(0)
        return f"{m.group(1)}{dict(sorted(d.items()))!r}]"

    return re.sub(r"^(#\s+\w+: dict \[Default: )(\{.*\})\]$", fix, text, flags=re.M)


def arguments(params: Params, data: str | None, data_repo: str, data_rev: str, tracking_uri: str | None,
              overrides: dict | None) -> dict:
    """Pipeline arguments: the section dicts of ``params`` with ``section.key=value`` overrides applied."""
    if data:
        params = params.replace("prepare", input=data)
    for name, value in (overrides or {}).items():
        section, _, key = name.partition(".")
        if section not in PIPELINE_SECTIONS or not key:
            raise MltagError(f"pipeline parameter {name!r} is not SECTION.KEY with SECTION one of "
                             f"{', '.join(PIPELINE_SECTIONS)}")
        params = params_from_dict({section: {key: value}}, "--arg", base=params)
    args = {s: no_nulls(dataclasses.asdict(getattr(params, s))) for s in PIPELINE_SECTIONS}
    args.update(data_repo=data_repo, data_rev=data_rev)
    if tracking_uri:
        args["tracking_uri"] = tracking_uri
    return args


def run_local(data: str = "data/demo", data_repo: str = "", data_rev: str = "", pipeline_root: str | None = None,
              tracking_uri: str | None = None, overrides: dict | None = None, params: Params | None = None):
    """Run the whole DAG on this machine with ``kfp.local.SubprocessRunner(use_venv=False)``.

    Every step runs in a subprocess with this Python (mltag installed), so the DAG,
    the ParallelFor fan-out and the artifact passing are the real ones.
    """
    import logging

    from kfp import local

    from mltag import tracking

    params = params or load_params(None)
    if not data_repo and "://" not in data:
        if not Path(data).exists() and Path(data) == Path("data/demo"):
            from mltag.demo import make_demo_data

            make_demo_data(data)  # the built-in demo data, as `dvc repro` would make it
        data = str(Path(data).resolve())
    store = params.bottleneck.cache_dir
    if "://" not in store and not Path(store).is_absolute():
        # every local step sees this machine's folders: share the vector store with `dvc repro`
        params = params.replace("bottleneck", cache_dir=str(Path(store).resolve()))
    uri = tracking.tracking_uri(tracking_uri)
    root = str(Path(pipeline_root or "local_outputs").resolve())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root)
    fn = build_pipeline(params)
    result = fn(**arguments(params, data, data_repo, data_rev, uri, overrides))
    logging.getLogger(__name__).info("pipeline: local run finished; artifacts under %s; MLflow at %s", root, uri)
    return result


def submit(host: str, experiment: str = "mltag", data: str = "", data_repo: str = "", data_rev: str = "",
           tracking_uri: str | None = None, overrides: dict | None = None, params: Params | None = None):
    """Submit a run of the pipeline, compiled from ``params``, to a KFP endpoint."""
    import logging

    import kfp

    params = params or load_params(None)
    args = arguments(params, data or None, data_repo, data_rev, tracking_uri, overrides)
    compiled = compile_pipeline(Path(os.environ.get("TMPDIR", "/tmp")) / "mltag-pipeline.yaml", params)
    try:
        client = kfp.Client(host=host)
        run = client.create_run_from_pipeline_package(str(compiled), arguments=args, experiment_name=experiment)
    except Exception as e:  # noqa: BLE001 - connection and auth errors come in many types
        raise MltagError(f"cannot submit to {host}: {type(e).__name__}: {str(e)[:300]}") from None
    logging.getLogger(__name__).info("pipeline: submitted run %s to %s (experiment %s)", run.run_id, host, experiment)
    return run
