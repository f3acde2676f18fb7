"""Compile, run locally (kfp.local) or submit the pipeline to a Kubeflow Pipelines endpoint."""

from __future__ import annotations

import io
import os
import re
import threading
import time
from pathlib import Path

from mltag.config import Params, load_params, params_from_dict
from mltag.errors import MltagError
from mltag.kubeflow.pipeline import PIPELINE_SECTIONS, build_pipeline, no_nulls

COMPILED = Path("pipeline") / "pipeline.yaml"


def compile_pipeline(out: str | os.PathLike = COMPILED, params: Params | None = None,
                     allow_dirty: bool = False) -> Path:
    """Compile with the defaults and placement of ``params`` (default: ./params.yaml when present).

    The image every task runs in is tagged by the package version and a digest of mltag's own
    source (``mltag.kubeflow.image``), so a cluster never reuses results of older code. Source
    with uncommitted changes is refused unless ``allow_dirty``: its image could not be rebuilt
    from any commit.
    """
    from kfp import compiler

    from mltag.files import atomic_path
    from mltag.kubeflow.image import check_clean_source

    check_clean_source(allow_dirty)
    out = _yaml_path(out)
    with atomic_path(out) as tmp:
        compiler.Compiler().compile(build_pipeline(params or load_params(None)), str(tmp))
        tmp.write_text(_stable_header(tmp.read_text(encoding="utf-8")), encoding="utf-8")
    return out


def _yaml_path(out: str | os.PathLike) -> Path:
    """A compiled pipeline's file: KFP writes YAML only to a name ending in .yaml or .yml."""
    out = Path(out)
    if out.suffix not in (".yaml", ".yml") or out.is_dir():
        raise MltagError("a compiled pipeline is a YAML file: give a name ending in .yaml (e.g. pipeline.yaml)", out)
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


def effective_params(params: Params, data: str | None, overrides: dict | None) -> Params:
    """``params`` with ``--data`` and the ``section.key=value`` overrides applied: what the run will use."""
    if data:
        params = params.replace("prepare", input=data)
    for name, value in (overrides or {}).items():
        section, _, key = name.partition(".")
        if section not in PIPELINE_SECTIONS or not key:
            raise MltagError(f"pipeline parameter {name!r} is not SECTION.KEY with SECTION one of "
                             f"{', '.join(PIPELINE_SECTIONS)}")
        params = params_from_dict({section: {key: value}}, "--arg", base=params)
    return params


def arguments(params: Params, data: str | None, data_repo: str, data_rev: str, tracking_uri: str | None,
              overrides: dict | None) -> dict:
    """Pipeline arguments: the section dicts of ``params`` with ``section.key=value`` overrides applied."""
    params = effective_params(params, data, overrides)
    args = {s: no_nulls(getattr(params, s).model_dump()) for s in PIPELINE_SECTIONS}
    args.update(data_repo=data_repo, data_rev=data_rev)
    if tracking_uri:
        args["tracking_uri"] = tracking_uri
    return args


class TaskLines(io.TextIOBase):
    """Stands in for ``sys.stdout`` while kfp.local runs: one line per finished task, not its whole log.

    kfp.local prints each task's banner, executor input, streamed log and outputs (about
    a hundred lines a task). This keeps each task's lines apart (per thread: a ParallelFor
    runs tasks side by side), prints ``name  status  seconds  computed|cached`` when the
    task ends, and the log of a task that failed. ``verbose`` passes everything through.
    """

    _ANSI = re.compile(r"\x1b\[[0-9;]*m")
    _START = re.compile(r"Executing task '([^']+)'")
    _END = re.compile(r"Task '([^']+)' finished with status (\w+)")
    _HIT = re.compile(r"Task (\S+) cache hit")

    def __init__(self, out, verbose: bool = False):
        super().__init__()
        self.out, self.verbose = out, verbose
        self.rows: list[tuple[str, str, float, str]] = []
        self.logs: dict[str, list[str]] = {}
        self._started: dict[int, tuple[str, float]] = {}  # thread -> (task, start time)
        self._current: dict[int, str] = {}
        self._partial: dict[int, str] = {}
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.verbose:
            self.out.write(text)
        me = threading.get_ident()
        with self._lock:
            buf = self._partial.get(me, "") + text
            *lines, self._partial[me] = buf.split("\n")
            for line in lines:
                self._line(me, self._ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def _line(self, me: int, line: str) -> None:
        if m := self._START.search(line):
            self._current[me] = m.group(1)
            # by thread: a ParallelFor's iterations share one task name and run side by side
            self._started[me] = (m.group(1), time.time())
            self.logs[m.group(1)] = []
        elif m := self._END.search(line):
            self._row(m.group(1), m.group(2), "computed", me)
        elif m := self._HIT.search(line):
            self._row(m.group(1), "SUCCESS", "cached")
        elif me in self._current:
            self.logs[self._current[me]].append(line)

    def _row(self, name: str, status: str, how: str, me: int | None = None) -> None:
        started = self._started.get(me) if how == "computed" else None
        if started is None or started[0] != name:  # the end printed by another thread: the latest start of its name
            started = next((v for v in reversed(self._started.values()) if v[0] == name), None) \
                if how == "computed" else None
        seconds = max(0.0, time.time() - started[1]) if started else 0.0
        self.rows.append((name, status, seconds, how))
        if not self.verbose:
            self.out.write(f"  {name:<28} {status:<8} {seconds:7.1f} s  {how}\n")
            self.out.flush()

    def failed_log(self, tail: int = 40) -> str:
        """The last lines of each task that did not succeed (what a user needs to see why)."""
        bad = [name for name, status, _, _ in self.rows if status != "SUCCESS"]
        bad += [name for name in self._current.values() if name not in {r[0] for r in self.rows}]
        out = []
        for name in dict.fromkeys(bad):
            lines = [ln for ln in self.logs.get(name, []) if ln.strip()]
            out += [f"--- {name} (last {min(tail, len(lines))} lines of its log) ---", *lines[-tail:]]
        return "\n".join(out)


# KFP warnings that say nothing about a local run of this pipeline, filtered by their text.
LOCAL_NOISE = (
    (r"You may be attemping to run a task that uses custom or non-Python base image", RuntimeWarning),
    (r"'\.\w+\(\)' is not used by the current local runner", UserWarning),
    (r"Task '[^']+': settings \[.*\] have no effect in the current local runner", UserWarning),
)


def orphan_handler(lines: TaskLines):
    """A root-logger handler for what kfp.local logs outside a task's own logger: a cache hit, and the end of a task
    run beside others. Each task swaps the root logger's handlers for its own and puts back what it found on leaving;
    side by side (a ParallelFor), one that leaves first puts back what was there before the other began, so the
    other's "finished" line goes to this handler, or would go nowhere (its row was missing)."""
    import logging

    h = logging.StreamHandler(lines)
    h.addFilter(lambda r: "cache hit" in r.getMessage() or "finished with status" in r.getMessage())
    return h


def run_local(data: str = "data/demo", data_repo: str = "", data_rev: str = "", pipeline_root: str | None = None,
              tracking_uri: str | None = None, overrides: dict | None = None, params: Params | None = None,
              verbose: bool = False, cache: bool = False):
    """Run the whole DAG on this machine with ``kfp.local.SubprocessRunner(use_venv=False)``.

    Every step runs in a subprocess with this Python (mltag installed), so the DAG,
    the ParallelFor fan-out and the artifact passing are the real ones. One line per
    task is printed (``verbose``: kfp.local's whole output); ``cache`` turns on kfp.local's
    task cache (a task with the same inputs and code is not run again).

    Returns:
        ``(pipeline outputs, [(task, status, seconds, computed|cached), ...])``.
    """
    import builtins
    import logging
    import sys
    import warnings

    from kfp import local

    from mltag.tracking import runs as tracking

    params = params or load_params(None)
    if not data_repo and "://" not in data:
        if not Path(data).exists() and Path(data) == Path("data/demo"):
            from mltag.data.demo import make_demo_data

            make_demo_data(data, demo=params.demo)  # the built-in demo data, as `dvc repro` would make it
        data = str(Path(data).resolve())
    store = params.bottleneck.cache_dir
    if "://" not in store and not Path(store).is_absolute():
        # every local step sees this machine's folders: share the vector store with `dvc repro`
        params = params.replace("bottleneck", cache_dir=str(Path(store).resolve()))
    uri = tracking.tracking_uri(tracking_uri)
    root = str(Path(pipeline_root or "local_outputs").resolve())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root, enable_caching=cache)
    fn = build_pipeline(params, local=True)
    lines = TaskLines(sys.stdout, verbose)
    root_logger, hit = logging.getLogger(), orphan_handler(lines)
    level = root_logger.level
    with warnings.catch_warnings():
        for message, category in LOCAL_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        old_stdout, sys.stdout = sys.stdout, lines
        old_print = builtins.print  # kfp.local swaps print while a task runs, and can leave it swapped
        root_logger.addHandler(hit)
        root_logger.setLevel(min(level or logging.WARNING, logging.INFO))
        # The URI (it may hold a password) reaches the local tasks through their environment: a pipeline
        # argument is recorded by KFP, in the run's spec and its logs.
        old_uri, os.environ["MLFLOW_TRACKING_URI"] = os.environ.get("MLFLOW_TRACKING_URI"), uri
        try:
            result = fn(**arguments(params, data, data_repo, data_rev, None, overrides))
        except RuntimeError as e:
            sys.stdout = old_stdout
            if not verbose:
                print(lines.failed_log(), file=sys.stderr)
            raise MltagError(f"the local pipeline run failed: {tracking.scrub(str(e), uri)}"
                             + ("" if verbose else " (the task's log is above; -v shows every task's)")) from None
        finally:
            sys.stdout, builtins.print = old_stdout, old_print
            root_logger.removeHandler(hit)
            root_logger.setLevel(level)
            if old_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = old_uri
    return result, lines.rows


def check_cluster_paths(params: Params, data_repo: str = "") -> None:
    """No relative path reaches a cluster: a pod would resolve it against its own empty working folder."""
    from pathlib import PurePosixPath

    from mltag.data.fetch import is_remote

    data = params.prepare.input
    if not data_repo and not is_remote(data) and not PurePosixPath(data.removeprefix("file://")).is_absolute():
        raise MltagError(f"prepare.input {data!r} is a relative path, which no pod can see: give --data a bucket URI "
                         "(gs://..., s3://...), an absolute path on a volume every pod mounts, or a path inside "
                         "--data-repo")
    store = params.bottleneck.cache_dir
    if not is_remote(store) and not PurePosixPath(store.removeprefix("file://")).is_absolute():
        raise MltagError(f"bottleneck.cache_dir {store!r} is a relative path: on a cluster each pod would keep its "
                         "own vector store and forget it; set it to a bucket URI, or an absolute path with "
                         "pipeline.store_pvc (--arg bottleneck.cache_dir=gs://bucket/vectors)")


def submit(host: str, experiment: str = "mltag", data: str = "", data_repo: str = "", data_rev: str = "",
           tracking_uri: str | None = None, overrides: dict | None = None, params: Params | None = None,
           allow_dirty: bool = False):
    """Submit a run of the pipeline, compiled from ``params``, to a KFP endpoint."""
    import logging

    import kfp

    params = params or load_params(None)
    run_params = effective_params(params, data or None, overrides)
    check_cluster_paths(run_params, data_repo)  # before anything reaches the host
    args = arguments(params, data or None, data_repo, data_rev, tracking_uri, overrides)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mltag-submit-") as tmp:  # private, removed after the upload
        compiled = compile_pipeline(Path(tmp) / "pipeline.yaml", run_params, allow_dirty=allow_dirty)
        try:
            client = kfp.Client(host=host)
            run = client.create_run_from_pipeline_package(str(compiled), arguments=args, experiment_name=experiment)
        except Exception as e:  # noqa: BLE001 - connection and auth errors come in many types
            raise MltagError(f"cannot submit to {host}: {type(e).__name__}: {str(e)[:300]}") from None
    logging.getLogger(__name__).info("pipeline: submitted run %s to %s (experiment %s)", run.run_id, host, experiment)
    return run


BATCH_COMPILED = "pipeline/batch_predict.yaml"


def compile_batch_pipeline(out: str | os.PathLike = BATCH_COMPILED, parallelism: int = 4,
                           allow_dirty: bool = False) -> Path:
    """Compile the batch-prediction pipeline (``mltag.kubeflow.batch``), tagged like the main one."""
    from kfp import compiler

    from mltag.files import atomic_path
    from mltag.kubeflow.batch import build_batch_pipeline
    from mltag.kubeflow.image import check_clean_source

    check_clean_source(allow_dirty)
    out = _yaml_path(out)
    with atomic_path(out) as tmp:
        compiler.Compiler().compile(build_batch_pipeline(parallelism), str(tmp))
    return out


DRIFT_COMPILED = "pipeline/drift.yaml"


def compile_drift_pipeline(out: str | os.PathLike = DRIFT_COMPILED, allow_dirty: bool = False) -> Path:
    """Compile the drift pipeline (``mltag.kubeflow.batch``): one task, for a recurring run."""
    from kfp import compiler

    from mltag.files import atomic_path
    from mltag.kubeflow.batch import build_drift_pipeline
    from mltag.kubeflow.image import check_clean_source

    check_clean_source(allow_dirty)
    out = _yaml_path(out)
    with atomic_path(out) as tmp:
        compiler.Compiler().compile(build_drift_pipeline(), str(tmp))
    return out


def run_batch_local(images: str, model: str, shards: int = 4, pipeline_root: str | None = None,
                    tracking_uri: str | None = None) -> Path:
    """The batch-prediction pipeline on this machine (kfp.local): returns the gathered predictions CSV."""
    import builtins

    from kfp import local

    from mltag.kubeflow.batch import build_batch_pipeline
    from mltag.tracking import runs as tracking

    root = str(Path(pipeline_root or "local_outputs").resolve())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root)
    uri = tracking.tracking_uri(tracking_uri)
    old_uri, os.environ["MLFLOW_TRACKING_URI"] = os.environ.get("MLFLOW_TRACKING_URI"), uri  # never a parameter
    old_print = builtins.print
    try:
        images = str(Path(images).resolve()) if "://" not in images else images
        model = str(Path(model).resolve()) if Path(model).exists() else model
        gathered = build_batch_pipeline(parallelism=1)(images=images, model=model, shards=shards)
    except RuntimeError as e:
        raise MltagError(f"the local batch-prediction run failed: {tracking.scrub(str(e), uri)}") from None
    finally:
        builtins.print = old_print
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
    return Path(getattr(gathered, "output", gathered).path) / "predictions.csv"  # the pipeline task's one output
