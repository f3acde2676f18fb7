"""``mltag lineage NAME@ALIAS``: a registered version, followed back to what made it, on one screen.

The registry's version names its MLflow run; the run holds the data it was trained on (its MLflow dataset input:
name, source and version, as prepare recorded it), the project's commit and DVC experiment, the mltag version,
every parameter, and the figures evaluate, calibrate and register logged. Read-only: it changes nothing.
"""

from __future__ import annotations

from mltag.errors import MltagError

SHOWN_METRICS = ("test_map", "test_micro_f1", "calibrated_test_micro_f1", "registered_test_map", "review_issues")
SHOWN_PARAMS = ("backbone.handle", "bottleneck.views", "train.mode", "train.learning_rate", "train.epochs",
                "train.hidden_units", "train.loss", "calibrate.method", "prepare.salt", "train.n_train",
                "train.n_labels")


def parse_model(model: str) -> tuple[str, str | None, str | None]:
    """``NAME@ALIAS``, ``NAME/VERSION``, ``models:/...`` or ``NAME`` (its champion): ``(name, alias, version)``."""
    ref = model.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, None
    if "/" in ref:
        name, version = ref.split("/", 1)
        if not version.isdigit():
            raise MltagError(f"not a version number: {version!r} (give NAME@ALIAS or NAME/VERSION)")
        return name, None, version
    return ref, "champion", None


def lineage(model: str, tracking_uri: str | None = None) -> dict:
    """Where a registered version came from (``model``: ``NAME@ALIAS``, ``NAME/VERSION``, or ``NAME`` for its
    champion)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mltag.tracking import runs

    uri = runs.setup_checked(tracking_uri)
    name, alias, number = parse_model(model)
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException as e:
        raise MltagError(f"{model}: not in the registry of {runs.mask_uri(uri)} ({str(e).splitlines()[0][:200]})") from None
    run = client.get_run(mv.run_id)
    tags, trained_run = run.data.tags, run.data.tags.get(runs.MODEL_RUN_TAG) or mv.run_id
    datasets = [{"name": d.dataset.name, "source": d.dataset.source, "digest": d.dataset.digest,
                 "version": {t.key: t.value for t in d.tags}.get(runs.DATASET_VERSION_TAG)}
                for d in run.inputs.dataset_inputs]
    experiment = client.get_experiment(run.info.experiment_id)
    return {
        "model": f"{mv.name}/{mv.version}", "aliases": sorted(getattr(mv, "aliases", []) or []),
        "registered": mv.creation_timestamp, "content_hash": mv.tags.get("mltag.content_hash"),
        "gate": mv.tags.get("mltag.gate"), "run_id": mv.run_id, "trained_in_run": trained_run,
        "run_name": tags.get("mlflow.runName"), "experiment": experiment.name if experiment else None,
        "status": run.info.status, "datasets": datasets, "dataset_version": tags.get(runs.DATASET_VERSION_TAG),
        "dataset": tags.get("mltag.dataset"), "git_commit": tags.get("mltag.git_commit"),
        "dvc_experiment": tags.get("mltag.dvc_experiment"), "mltag_version": tags.get("mltag.version"),
        "params": dict(sorted(run.data.params.items())), "metrics": dict(sorted(run.data.metrics.items())),
        "tracking_uri": runs.mask_uri(uri),
    }


def render(r: dict) -> str:
    """The lineage as a person reads it: one screen."""
    def line(key, value):
        return f"{key:<15}{value if value not in (None, '') else '-'}"

    data = r["datasets"][0] if r["datasets"] else {}
    out = [line("model", f"{r['model']}" + (f"  ({', '.join(r['aliases'])})" if r["aliases"] else "")),
           line("gate", r["gate"]), line("content hash", r["content_hash"]),
           line("run", f"{r['run_id']}  {r['run_name'] or ''}  in {r['experiment']} ({r['status']})"),
           line("data", f"{data.get('name') or r['dataset'] or '-'}  {data.get('source') or ''}".rstrip()),
           line("data version", data.get("version") or r["dataset_version"]),
           line("code", f"mltag {r['mltag_version'] or '?'}, commit {r['git_commit'] or '-'}"),
           line("DVC experiment", r["dvc_experiment"])]
    shown = [(k, r["params"][k]) for k in SHOWN_PARAMS if k in r["params"]]
    out.append(line("params", "  ".join(f"{k}={v}" for k, v in shown)))
    figures = [(k, r["metrics"][k]) for k in SHOWN_METRICS if k in r["metrics"]]
    out.append(line("figures", "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures)))
    out.append(line("store", r["tracking_uri"]))
    out.append(f"(all {len(r['params'])} params and {len(r['metrics'])} metrics: mltag lineage {r['model']} --json)")
    return "\n".join(out)
