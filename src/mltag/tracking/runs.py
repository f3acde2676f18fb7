"""MLflow plumbing: where tracking goes, and the run that train opens and later steps join."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from mltag.files import signals_deferred

log = logging.getLogger(__name__)


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


def mask_uri(uri: str) -> str:
    """A tracking URI fit to print, log, tag or write: scheme, host, port and path only.

    A user name, password, token in the query or a fragment is dropped, so nothing mltag
    prints or stores holds a credential (``http://user:pw@h:5000/x?token=t`` -> ``http://h:5000/x``).
    """
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable URI>"
    if not parts.scheme or parts.scheme in ("file", "sqlite") and "@" not in parts.netloc:
        return uri.split("?", 1)[0]
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def scrub(text: str, uri: str) -> str:
    """``text`` with the credentials of ``uri`` replaced by ``***``: the URI itself becomes its masked
    form, a ``user:password@`` part anywhere goes, and so does a user name, password or query token
    standing as a word of its own. Never inside a word: with the user ``u``, ``ConnectionRefusedError``
    stays as it is."""
    import re
    from urllib.parse import parse_qsl, unquote, urlsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return text
    if parts.username is not None or parts.query or parts.fragment:
        text = text.replace(uri, mask_uri(uri)).replace(uri.rstrip("/"), mask_uri(uri))
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    for whole in sorted({userinfo, unquote(userinfo)} - {""}, key=len, reverse=True):
        text = text.replace(f"{whole}@", "***@")
    secrets = [parts.password, parts.username, parts.query, parts.fragment, *(v for _, v in parse_qsl(parts.query))]
    secrets += [unquote(x) for x in secrets if x]
    for secret in sorted({x for x in secrets if x}, key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9_]){re.escape(secret)}(?![A-Za-z0-9_])", "***", text)
    return text


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail within about ``timeout`` seconds when an http(s) tracking server does not answer.

    The probe goes through MLflow's own HTTP client and credentials (the URI's user and
    password, ``MLFLOW_TRACKING_TOKEN``...), so every URI MLflow accepts is accepted here.
    """
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.tracking._tracking_service.utils import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    from mltag.errors import MltagError

    try:
        http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0, backoff_factor=0,
                     timeout=timeout, raise_on_status=False)
    except Exception as e:  # noqa: BLE001 - connection errors come wrapped in many types
        reason = scrub(_root_cause(e), uri)
        raise MltagError(f"MLflow tracking server {mask_uri(uri)} does not answer ({reason}). Start it or point "
                         "MLFLOW_TRACKING_URI (or --tracking-uri) at a live one, then rerun this step: its inputs "
                         "are intact and the earlier steps' outputs (and cached vectors) are kept, so only this "
                         "step's own work is repeated") from None


def _root_cause(e: BaseException) -> str:
    """The innermost error's type and first line: 'ConnectionRefusedError: ...', not a retry summary."""
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


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
    if mask_uri(uri) != uri.split("?", 1)[0] or "?" in uri:
        # MLflow prints "View run ... at: <URI>" after each run, credentials and all: not with these.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
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


def save_run_ref(folder: str | os.PathLike, run_id: str, experiment_id: str, uri: str,
                 experiment: str = "mltag") -> None:
    from mltag.data.formats import write_run_ref

    write_run_ref(folder, {"run_id": run_id, "experiment_id": experiment_id, "experiment": experiment,
                           "tracking_uri": mask_uri(uri)})


def run_ref_of(model_dir: str | os.PathLike) -> dict | None:
    """What train recorded about its MLflow run in the model folder, or None."""
    from mltag.data.formats import read_run_ref

    return read_run_ref(model_dir)


def run_id_of(model_dir: str | os.PathLike) -> str | None:
    ref = run_ref_of(model_dir)
    return ref["run_id"] if ref else None


MODEL_RUN_TAG = "mltag.model_run_id"
MODEL_DIGEST_TAG = "mltag.model_digest"  # the content hash of the model folder train wrote


def model_run(model_dir: str | os.PathLike, run_id: str | None, uri: str) -> str | None:
    """The MLflow run that evaluate, calibrate and register log into, in the store at ``uri``.

    An explicit ``run_id`` (Kubeflow passes train's) must exist there: if not, the error
    names the run and the store. Otherwise the model folder's ``run.json`` names train's
    run; when this store does not hold it (the model came from the DVC run cache, ``dvc
    pull`` or a ``dvc exp run --temp`` workspace, trained against another store), the
    steps share one stand-in run here, tagged with train's run id, found again by that
    tag. None when the model has no run at all.
    """
    import mlflow
    from mlflow import MlflowClient

    from mltag.errors import MltagError

    client = MlflowClient()
    if run_id:
        if not _run_exists(client, run_id):
            raise MltagError(
                f"MLflow run {run_id} does not exist in the tracking store {mask_uri(uri)}. The step that created it "
                "(train) logged to another store: give every step the same tracking URI (the tracking_uri "
                "pipeline parameter or the mlflow-tracking secret on Kubeflow; MLFLOW_TRACKING_URI locally)")
        return run_id
    ref = run_ref_of(model_dir)
    if ref is None:
        return None
    if _run_exists(client, ref["run_id"]):
        return ref["run_id"]
    found = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1,
                               filter_string=f"tags.`{MODEL_RUN_TAG}` = '{ref['run_id']}'")
    if found:
        return found[0].info.run_id
    exp = mlflow.set_experiment(ref.get("experiment") or "mltag")
    run = client.create_run(exp.experiment_id, run_name=f"model-of-{ref['run_id'][:8]}", tags={
        MODEL_RUN_TAG: ref["run_id"], "mltag.trained_in": mask_uri(ref.get("tracking_uri", ""))})
    client.set_terminated(run.info.run_id)
    log.warning("train's MLflow run %s is not in %s (this model was trained against %s, or restored from a "
                "DVC cache); logging into run %s instead, tagged %s", ref["run_id"], mask_uri(uri),
                mask_uri(ref.get("tracking_uri", "another store")), run.info.run_id, MODEL_RUN_TAG)
    return run.info.run_id


def owner_tags(out: str | os.PathLike) -> dict[str, str]:
    """Tags that say which process on which machine writes which model folder (to find its run if it dies)."""
    import socket

    return {"mltag.host": socket.gethostname(), "mltag.pid": str(os.getpid()), "mltag.out": str(Path(out).absolute())}


def run_identity(dataset: str | None, experiment: str = "") -> tuple[str, dict[str, str]]:
    """train's run as a person finds it in the MLflow UI: ``(experiment, tags)``, the run's name among the tags
    (``mlflow.runName``).

    The experiment is ``experiment`` (``tracking.experiment``) or, when that is empty, one per dataset
    named as its registered model (``mltag-demo``, ``mltag-photos``), so the demo's runs and yours never
    mix. The run is named after the dataset and the DVC experiment (``dvc exp run`` sets
    ``DVC_EXP_NAME``) or else the project's commit: ``photos/mucid-kine``, ``photos@1a2b3c4``. Tags:
    ``mltag.dataset`` (what prepare read), ``mltag.dvc_experiment`` and ``mltag.git_commit`` (the
    project's commit; under ``dvc exp run``, the experiment's baseline commit).
    """
    from mltag.config import derived_model_name
    from mltag.data.fetch import git_rev

    named = derived_model_name(dataset) if dataset else "mltag"
    exp = os.environ.get("DVC_EXP_NAME") or None
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or git_rev(".")
    short = named.removeprefix("mltag-") if dataset else "mltag"
    name = f"{short}/{exp}" if exp else f"{short}@{commit[:7]}" if commit else short
    tags = {"mlflow.runName": name, "mltag.step": "train"}
    if dataset:
        tags["mltag.dataset"] = mask_uri(dataset)[:500]
    if exp:
        tags["mltag.dvc_experiment"] = exp
    if commit:
        tags["mltag.git_commit"] = commit
    return experiment or named, tags


def close_stale_runs(experiment_id: str, out: str | os.PathLike, pid: int | None = None) -> list[str]:
    """End as KILLED the RUNNING runs of this model folder whose process on this machine is gone.

    A train killed with kill -9 cannot end its own run; the next train of the same model
    folder does, with a note, so the MLflow UI never shows a run that runs forever.
    Runs of other machines are left alone: this one cannot tell whether they are alive.
    """
    import mlflow
    from mlflow import MlflowClient

    from mltag.files import _pid_alive

    mine = owner_tags(out)
    found = mlflow.search_runs([experiment_id], output_format="list", max_results=200,
                               filter_string=f"attributes.status = 'RUNNING' and tags.`mltag.host` = '{mine['mltag.host']}'")
    closed = []
    client = MlflowClient()
    for run in found:
        tags = run.data.tags
        if tags.get("mltag.out") != mine["mltag.out"] or not tags.get("mltag.pid", "").isdigit():
            continue
        if _pid_alive(int(tags["mltag.pid"])):
            continue
        client.set_tag(run.info.run_id, "mltag.note", f"ended as KILLED by a later train (pid {pid or os.getpid()}): its "
                       f"process {tags['mltag.pid']} on {mine['mltag.host']} was gone")
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
        log.warning("train: MLflow run %s was left RUNNING by a process that is gone (pid %s); ended it as KILLED",
                    run.info.run_id, tags["mltag.pid"])
    return closed


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as e:
        if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return False
        raise
    return True


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def models_cache() -> Path:
    """Where registered models are downloaded: ``$MLTAG_MODEL_CACHE``, else the per-user cache
    (``$XDG_CACHE_HOME/mltag/models`` or ``~/.cache/mltag/models``), private to the user."""
    if os.environ.get("MLTAG_MODEL_CACHE"):
        root = Path(os.environ["MLTAG_MODEL_CACHE"]).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "mltag" / "models"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return root


def _unloadable(asked: str, version, why: str):
    from mltag.errors import MltagError

    return MltagError(f"cannot load {asked} (version {version.version} of {version.name}, run {version.run_id}): its "
                      f"artifacts are missing or unreadable ({why}); promote another version (mltag promote "
                      f"{version.name} VERSION) or register a new one")


def _download(model: str, dest: Path) -> Path:
    """``model``'s artifacts in ``dest``, downloaded once: under a lock (two predicts wait for one download),
    into a partial folder renamed into place when whole, so a failed or killed download leaves nothing."""
    import shutil

    import mlflow

    from mltag.files import lock_beside, locked

    if (dest / "done").is_file():
        return dest
    with locked(lock_beside(dest), f"the download of {model}"):
        if not (dest / "done").is_file():
            part = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
            shutil.rmtree(part, ignore_errors=True)
            part.mkdir(parents=True)
            try:
                mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(part))
                (part / "done").write_text("")
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(part, dest)
            finally:
                shutil.rmtree(part, ignore_errors=True)
    return dest


def local_model(model: str, explicit_uri: str | None = None) -> Path:
    """A local model folder for ``model``: a folder as is, a ``models:/`` or ``runs:/`` URI downloaded once
    (shared by predict and suggest)."""
    from mltag.errors import MltagError

    p = Path(model)
    if p.is_dir() and (p / "model.json").is_file():
        return p
    if "://" not in model and not model.startswith(("models:/", "runs:/")):
        raise MltagError("not a model folder (no model.json) nor a models:/ or runs:/ URI", model)
    import hashlib

    import mlflow

    setup_checked(explicit_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per model, not per file
    asked, version = model, None
    try:
        # An alias moves, and a store recreated at the same place numbers its versions again: key the
        # download by the version's run and creation time, not by the URI.
        identity = model
        if model.startswith("models:/"):
            client = mlflow.MlflowClient()
            name, _, rest = model.removeprefix("models:/").partition("@")
            if rest:
                mv = client.get_model_version_by_alias(name, rest)
            else:
                name, _, number = name.partition("/")
                mv = client.get_model_version(name, number)
            model, version = f"models:/{mv.name}/{mv.version}", mv
            identity = f"{model}|{mv.run_id}|{mv.creation_timestamp}"
        key = hashlib.sha256(f"{mask_uri(tracking_uri(explicit_uri))}|{identity}".encode())
        dest = _download(model, models_cache() / key.hexdigest()[:20])
    except MltagError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow raises many kinds for a missing model
        first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        if version is not None:  # the registry names it, but its files are gone or unreadable
            raise _unloadable(asked, version, first) from None
        raise MltagError(f"cannot load model {asked}: {first}") from None
    found = [f.parent for f in dest.rglob("model.json")]
    if not found and version is not None:
        import shutil

        shutil.rmtree(dest, ignore_errors=True)  # nothing usable came: try again next time
        raise _unloadable(asked, version, "no model.json among them")
    if not found:
        raise MltagError(f"{model} holds no mltag model folder (no model.json among its artifacts)")
    return found[0]


# --------------------------------------------------------------------------- a step's MLflow calls
#
# The calls a step makes, as plain functions with plain arguments, run in the step's own process
# through a ``Tracker`` (one place that reports a dead store, holds stops and ends a failed train's run).

def open_train_run(experiment: str, out: str, tags: dict, params: dict, step_tags: dict,
                   dataset: tuple[str, str | None] | None = None) -> tuple[str, str]:
    """train's run: the experiment set, this folder's stale runs closed, a new run started (and left
    active, as ``mlflow.start_run`` leaves it) with its params and tags, and ``dataset`` ``(source, version)``
    as its MLflow dataset input (the UI's Datasets column). Returns its ids."""
    import mlflow

    from mltag import __version__

    exp = mlflow.set_experiment(experiment)
    close_stale_runs(exp.experiment_id, out, pid=int(tags["mltag.pid"]))
    run = mlflow.start_run(tags=tags)
    mlflow.log_params(params)
    mlflow.set_tags({**step_tags, "mltag.version": __version__})
    if dataset is not None:
        log_dataset(*dataset)
    return run.info.run_id, run.info.experiment_id


DATASET_VERSION_TAG = "mltag.dataset_version"


def log_dataset(source: str, version: str | None) -> None:
    """The active run's training dataset as an MLflow dataset input: named after its folder, its source (masked),
    a digest of its version (MLflow keeps 36 characters), and the whole version as a tag of the input and the run."""
    import hashlib
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from mltag.config import derived_model_name

    name = derived_model_name(source).removeprefix("mltag-")
    version = version or "unknown"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow warns when it guesses a local path's source type
        src = resolve_dataset_source(mask_uri(source))
    ds = MetaDataset(src, name=name, digest=hashlib.sha256(version.encode()).hexdigest()[:16])
    mlflow.log_input(ds, context="training", tags={DATASET_VERSION_TAG: version[:500]})
    mlflow.set_tag(DATASET_VERSION_TAG, version[:500])


def log_to_run(run_id: str, metrics: dict | None = None, tags: dict | None = None,
               artifacts: list[tuple[str, str | None]] = (), series: dict[str, list[float]] | None = None) -> None:
    """Log into ``run_id`` (the active run, or resumed for the call as ``mlflow.start_run(run_id=...)``):
    metrics, tags, artifacts ``(file, artifact folder)`` and per-step ``series`` (one request per
    1000 values)."""

    import mlflow
    from mlflow.entities import Metric

    active = mlflow.active_run()
    with contextlib.nullcontext() if active and active.info.run_id == run_id else mlflow.start_run(run_id=run_id):
        if series:
            import time

            now = int(time.time() * 1000)
            values = [Metric(k, v, now, i) for k, vs in series.items() for i, v in enumerate(vs)]
            for i in range(0, len(values), 1000):
                mlflow.MlflowClient().log_batch(run_id, metrics=values[i: i + 1000])
        if metrics:
            mlflow.log_metrics(metrics)
        if tags:
            mlflow.set_tags(tags)
        for path, folder in artifacts:
            mlflow.log_artifact(path, folder)


RUN_LOG_KEY = "mlflow"  # the key of a step report (details.json) that holds what register logs for the step


def for_the_run(metrics: dict[str, float], artifacts: dict[str, str]) -> dict:
    """What evaluate, calibrate and review keep in their ``details.json`` for the model's MLflow run (under
    ``RUN_LOG_KEY``): ``metrics``, and ``artifacts`` as ``{file in the report's folder: artifact folder}``.
    register logs it (``step_report_logs``): the steps between train and register never open MLflow."""
    return {"metrics": {k: float(v) for k, v in metrics.items() if v is not None},
            "artifacts": dict(artifacts)}


def step_report_logs(reports: list[str | os.PathLike]) -> tuple[dict[str, float], list[tuple[str, str]]]:
    """The metrics and ``(file, artifact folder)`` pairs that the step reports (each a ``details.json`` that
    evaluate, calibrate or review wrote) keep for the model's run. A report without them is an error naming it."""
    import json

    from mltag.errors import MltagError

    metrics: dict[str, float] = {}
    artifacts: list[tuple[str, str]] = []
    for report in map(Path, reports):
        try:
            kept = json.loads(report.read_text(encoding="utf-8"))[RUN_LOG_KEY]
            metrics.update({str(k): float(v) for k, v in kept["metrics"].items()})
            files = [(report.parent / name, folder) for name, folder in kept["artifacts"].items()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise MltagError(f"not a step report with figures for the model's run ({type(e).__name__}: {e}); give "
                             "the details.json that evaluate, calibrate or review wrote", report) from None
        for f, folder in files:
            if not f.is_file():
                raise MltagError(f"the step report names {f.name}, which is not beside it; rerun that step", report)
            artifacts.append((str(f), folder))
    return metrics, artifacts


def end_run(status: str = "FINISHED") -> None:
    import mlflow

    mlflow.end_run(status)


class Tracker:
    """One step's MLflow calls, in the step's own process.

    The store is checked first (as ``setup_checked``), so a dead server is reported when the tracker is made: steps
    make it before they write their outputs. Each call runs with SIGTERM and Ctrl-C held until it returns, so a stop
    never cuts one in half; an ``MlflowException`` propagates (the CLI turns it into one line naming the masked
    store). ``abandon`` ends a failed step's run with the status it is given (FAILED, KILLED) and never hides the
    step's own error.
    """

    def __init__(self, tracking_uri_: str | None):
        self.uri = tracking_uri(tracking_uri_)
        setup_checked(tracking_uri_)

    def open_train_run(self, *args, **kwargs) -> tuple[str, str]:
        """``open_train_run``: the run started and left active; its run and experiment ids."""
        with signals_deferred():
            return open_train_run(*args, **kwargs)

    def log_to_run(self, run_id: str, **kwargs) -> None:
        with signals_deferred():
            log_to_run(run_id, **kwargs)

    def end_run(self, status: str = "FINISHED") -> None:
        with signals_deferred():
            end_run(status)

    def abandon(self, status: str) -> None:
        """The step failed: end its run with ``status``, a failure to do so not hiding the step's own."""
        try:
            self.end_run(status)
        except Exception:  # noqa: BLE001 - the step's error matters more
            log.debug("tracking: ending the run %s after a failed step did not work", status, exc_info=True)
