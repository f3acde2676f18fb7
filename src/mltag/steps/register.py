"""register: log the model to MLflow, register a version, alias it ``challenger``, gate ``champion``.

The gate re-scores the current champion on the current test split (never trusting old
tags) and promotes the challenger only when its test mAP beats the champion's by more
than ``margin`` and no label's AP drops by more than ``max_label_ap_drop``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mltag import config
from mltag import metrics as M
from mltag.config import derived_model_name
from mltag.data.formats import (
    dataset_source,
    image_root_of,
    load_hashes,
    load_prepared,
    read_model_meta,
    read_thresholds,
)
from mltag.data.integrity import INTEGRITY_FILE, verify_integrity
from mltag.errors import MltagError
from mltag.files import fault_point, process_token, remove_stale_leftovers, write_json_atomic
from mltag.inference.export import BACKBONE_DIR
from mltag.inference.quantized import EVALUATED_TOLERANCE, tflite_parity
from mltag.registry.card import log_card
from mltag.registry.gate import decide, scores_from_vectors
from mltag.registry.versions import alias, create_version, model_hash, move_aliases, signature, version_with_hash

log = logging.getLogger(__name__)


def _bundle(model_dir: Path, thresholds_file: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in (BACKBONE_DIR, "inference", "model.json", "labels.txt", "model.tflite", "head.npz", "head.keras",
                 INTEGRITY_FILE):
        src = model_dir / name
        if src.exists():
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / name)
    shutil.copy2(thresholds_file, dest / "thresholds.json")
    return dest


def _cached_test_vectors(bottlenecks, meta: dict, test_paths: list[str]) -> np.ndarray | None:
    """The test split's cached vectors, when they are what the model's own backbone gives (head mode,
    the same backbone and size; ``meta``: its model.json) and list the same images as the prepared
    test split; else None."""
    from mltag.data.formats import load_split, read_bottleneck_meta

    bmeta = read_bottleneck_meta(bottlenecks)
    if not scores_from_vectors(meta, bmeta["backbone_id"], bmeta["image_size"]):
        return None
    x, _, paths = load_split(bottlenecks, "test")
    if [str(p) for p in paths] != [str(p) for p in test_paths]:
        log.info("register: the bottlenecks' test split differs from the prepared one; scoring the images")
        return None
    return x


SCRATCH = "mltag-register"


def _check_challenger(model_dir: Path, thresholds: Path, tmp: Path, meta: dict, bottlenecks, test, test_images,
                      y_test: np.ndarray, labels: list[str], prepared, root: Path, register: config.Register,
                      test_hashes) -> tuple[Path, np.ndarray | None, np.ndarray, dict | None]:
    """What register decides on, without MLflow: the bundle (model folder + thresholds) in ``tmp``, the
    challenger's test scores (the cached vectors' when they match, as evaluate scored them; else from
    the images) and, with ``register.tflite``, the LiteRT parity table (raising when model.tflite
    differs from what was evaluated)."""
    bundle = _bundle(model_dir, thresholds, tmp / "model")
    cached = _cached_test_vectors(bottlenecks, meta, [ex.path for ex in test]) if bottlenecks else None
    if cached is not None:  # the scores evaluate measured: the head on the test images' cached vectors
        from mltag.head.saved import head_scores

        chall_scores = head_scores(bundle, cached)
    else:
        from mltag.inference.model import InferenceModel

        chall_scores = InferenceModel(bundle).scores(test_images) if test_images else np.zeros((0, len(labels)))
    parity = None
    if register.tflite:
        _, train_ex = load_prepared(prepared, "train")
        parity = tflite_parity(bundle, test_images, y_test, labels, [root / ex.path for ex in train_ex],
                               chall_scores, int8=register.int8, int8_images=register.int8_images,
                               max_drop=register.int8_max_drop, evaluated=cached is not None,
                               test_hashes=test_hashes)
        if "error" in parity:  # asked for, and missing: never a version without what register.tflite promises
            raise MltagError(f"register.tflite is true but the model cannot give its LiteRT files: {parity['error']}; "
                             "nothing was registered (set register.tflite: false to register it without them)",
                             model_dir)
        write_json_atomic(bundle / "tflite_parity.json", parity)
        for key, tol, what in (("fp32_max_abs_diff_vs_savedmodel", 1e-4, "the SavedModel"),
                               ("fp32_max_abs_diff_vs_evaluated", EVALUATED_TOLERANCE, "the evaluated scores")):
            if parity.get(key, 0.0) > tol:
                raise MltagError(f"model.tflite differs from {what} by {parity[key]:.2e} (> {tol}); "
                                 "not registering", model_dir / "model.tflite")
    return bundle, cached, chall_scores, parity


def _scratch(out: Path) -> Path:
    """register's scratch folder, beside ``out``: writing there proves ``out`` writable before the
    registry is touched, and what a killed register left there is removed (once its process is gone)."""
    if out.is_dir():
        raise MltagError("--out is a folder; give a file name for register's decision (JSON)", out)
    if out.exists() and not os.access(out, os.W_OK):
        raise MltagError("--out is not writable; nothing was registered", out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_leftovers(out.parent, SCRATCH)
        return Path(tempfile.mkdtemp(prefix=f".{SCRATCH}.{process_token()}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise MltagError(f"cannot write register's output here ({e.strerror or e}); nothing was registered",
                         out.parent) from None


def _check_recorded_digest(client, model_dir: Path, digest: str) -> None:
    """The folder's content hash must be the one train tagged its run with, when that run is in this store."""
    from mltag.tracking import runs as tracking

    ref = tracking.run_ref_of(model_dir)
    if not ref or not tracking._run_exists(client, ref["run_id"]):
        return
    recorded = client.get_run(ref["run_id"]).data.tags.get(tracking.MODEL_DIGEST_TAG)
    if recorded and recorded != digest:
        raise MltagError(f"this model folder's content hash differs from the one train recorded in MLflow run "
                         f"{ref['run_id']} ({recorded[:12]}...): the folder was changed after training; not "
                         "registering", model_dir)


def register(model_dir: str | os.PathLike, thresholds: str | os.PathLike, prepared: str | os.PathLike,
             out: str | os.PathLike, *, register: config.Register, tracking: config.Tracking,
             images: str | os.PathLike | None = None, tracking_uri: str | None = None, run_id: str | None = None,
             config: dict | None = None, bottlenecks: str | os.PathLike | None = None,
             card: str | os.PathLike | None = None, metrics_file: str | os.PathLike | None = None,
             reports: list[str | os.PathLike] = ()) -> dict:
    """Log, register and (maybe) promote the model; write the decision to ``out``, its headline figures to
    ``metrics_file`` (the version, whether the gate passed, whether it was promoted) when given, and the version's model
    card (logged with its run) to ``card`` (Markdown, and HTML beside it) when given.

    With ``bottlenecks`` (the folder the model was trained on), a model that uses its backbone
    as it is (head mode) is scored on the test split from the cached vectors, as evaluate
    scored it, and so is a champion with the same backbone (its own head on the same
    vectors); otherwise both are scored end to end from the images.

    ``register`` and ``tracking`` are the typed params sections. With ``register.tflite`` the registered version also carries ``model.tflite`` (fp32) and
    ``model_int8.tflite`` with ``tflite_parity.json`` (fp32 vs SavedModel, int8 vs fp32).

    ``reports``: the ``details.json`` of evaluate, calibrate and review (the steps between train and register
    open no MLflow store): the figures and files each keeps for the model's run are logged into it, with the
    thresholds, before the decision, also for an exploratory ``dvc exp run``.
    """
    model_name = register.model_name or derived_model_name(dataset_source(prepared))
    register = register.model_copy(update={"model_name": model_name})
    experiment = tracking.experiment or derived_model_name(dataset_source(prepared))  # as train names it
    model_dir, thresholds, out = Path(model_dir), Path(thresholds), Path(out)
    digest = verify_integrity(model_dir)  # a hand-edited model folder never reaches the registry
    meta = read_model_meta(model_dir, verify=False)
    read_thresholds(thresholds, meta["labels"])
    from mltag.tracking.runs import step_report_logs

    step_metrics, step_files = step_report_logs(list(reports))  # a bad report is said before the registry
    labels, test, root, test_images, y_test, test_hashes = _test_split(prepared, images)
    tmp = _scratch(out)  # also proves --out's folder writable, before the registry is touched
    try:
        import mlflow

        # the folder checked against what train recorded (and a dead store said) before any scoring
        client, uri, run_id = _connect(model_dir, run_id, tracking_uri, digest, labels, meta["labels"], experiment)
        bundle, cached, chall_scores, parity = _check_challenger(
            model_dir, thresholds, tmp, meta, bottlenecks, test, test_images, y_test, labels, prepared, root,
            register, test_hashes)
        # 1. Decide before touching the registry: a failure here leaves no version behind.
        result, existing, champ = _gate_decision(client, register, model_dir, thresholds, uri, cached, chall_scores,
                                                 y_test, meta, labels, test_images, tmp)
        if register.tflite:
            result["tflite"] = parity
        fault_point("register:decided")
        dvc_exp = os.environ.get("DVC_EXP_NAME") if register.experiments == "decide" else None
        from mltag.files import signals_deferred

        with signals_deferred(), mlflow.start_run(run_id=run_id) as run:  # Ctrl-C after, never inside, a registry write
            result["run_id"] = run.info.run_id
            _log_steps(step_metrics, step_files + [(str(thresholds), "calibrate")])
            if dvc_exp:
                _record_experiment(result, dvc_exp)
            else:
                _record_version(client, result, existing, champ, bundle, test_images, parity, config)
            log_card(client, result, meta, prepared, labels, y_test, chall_scores, thresholds,
                        parity if register.tflite else None, register, card)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _finish(result, config, out, metrics_file)


def _connect(model_dir: Path, run_id: str | None, tracking_uri: str | None, digest: str, labels: list[str],
             model_labels: list[str], experiment: str):
    """MLflow checked and the model's run found: ``(client, uri, run_id)``. The folder must be the one train
    recorded, for the labels the prepared data has."""
    import mlflow
    from mlflow import MlflowClient

    from mltag.tracking import runs as mltracking

    uri = mltracking.setup_checked(tracking_uri)
    client = MlflowClient()
    run_id = mltracking.model_run(model_dir, run_id, uri)
    _check_recorded_digest(client, model_dir, digest)
    if labels != model_labels:  # after the digest: an edited folder is reported as edited
        raise MltagError(f"the model scores labels {model_labels} but the prepared data has {labels}; train "
                         "on this data (or register against the data it was trained on)", model_dir / "model.json")
    if run_id is None:
        mlflow.set_experiment(experiment)
    return client, uri, run_id


def _gate_decision(client, register: config.Register, model_dir: Path, thresholds: Path, uri: str, cached,
                   chall_scores: np.ndarray, y_test: np.ndarray, meta: dict, labels: list[str],
                   test_images: list[Path], tmp: Path):
    """The gate's decision against the current champion, before anything is written: ``(result, the version
    with this content or None, the champion's version or None)``; ``result`` holds the decision
    (``gate_passed``, ``reason``)."""
    from mltag.tracking import runs as mltracking

    model_name = register.model_name
    chall_map = float(np.nanmean(M.average_precisions(y_test, chall_scores)))
    content = model_hash(model_dir, thresholds)
    existing = version_with_hash(client, model_name, content)
    champ = alias(client, model_name, "champion")
    result = {"model_name": model_name, "labels": labels, "challenger_test_map": chall_map,
              "tracking_uri": mltracking.mask_uri(uri), "champion_version": None, "champion_test_map": None, "content_hash": content,
              "scored_from": "cached vectors" if cached is not None else "images", "champion_scored_from": None}
    th, min_labels, groups = M.decision_rule(read_thresholds(thresholds, labels), labels)
    chall = (chall_scores, M.decide(chall_scores, th, min_labels, groups))
    promote, reason = decide(client, register, champ, existing, chall, y_test, meta, labels, cached,
                             test_images, tmp, result)
    result.update({"gate_passed": promote, "promoted": promote, "reason": reason})
    return result, existing, champ


def _log_steps(metrics: dict[str, float], files: list[tuple[str, str]]) -> None:
    """What evaluate, calibrate and review keep for the model's run, into the active run."""
    import mlflow

    if metrics:
        mlflow.log_metrics(metrics)
    for path, folder in files:
        mlflow.log_artifact(path, folder)


def _version_tags(result: dict) -> dict:
    tags = {"mltag.content_hash": result["content_hash"], "mltag.test_map": f"{result['challenger_test_map']:.6f}",
            "mltag.labels": ",".join(result["labels"]),
            "mltag.gate": ("promoted: " if result["gate_passed"] else "kept: ") + result["reason"]}
    if "tflite" in result:
        parity = result["tflite"]
        tags["mltag.int8"] = str(parity.get("int8_reason") or parity.get("error", ""))[:500]
    return tags


def _record_experiment(result: dict, dvc_exp: str) -> None:
    """An exploratory ``dvc exp run``: the decision on the model's run, and nothing in the registry."""
    import mlflow

    promote = result["gate_passed"]
    result.update({"version": None, "promoted": False, "aliases": [], "reason": (
        f"DVC experiment {dvc_exp}: not registered (register.experiments: decide); the gate "
        f"{'would promote' if promote else 'would keep'} it: {result['reason']}")})
    mlflow.set_tag("mltag.gate", result["reason"][:5000])
    mlflow.log_metrics({"gate_passed": float(promote)})


def _record_version(client, result: dict, existing, champ, bundle: Path, test_images: list[Path], parity,
                    config: dict | None) -> None:
    """The version of this content (made, or found), ``challenger`` on it and ``champion`` when the gate passed,
    logged in the active run."""
    import mlflow

    model_name, tags = result["model_name"], _version_tags(result)
    mv = create_version(client, model_name, existing, tags, bundle, *signature(bundle, test_images))
    promote, reason = move_aliases(client, model_name, mv, champ, result["gate_passed"], result["reason"])
    mlflow.log_metrics({"registered_test_map": result["challenger_test_map"]})
    if parity and "fp32_bytes" in parity:
        mlflow.log_metrics({f"tflite_{k}": v for k, v in parity.items() if isinstance(v, float) and k != "images"})
    mlflow.set_tag("mltag.registered_version", mv)
    if config:
        mlflow.log_dict(config, "register/config.json")
    result.update({"version": int(mv), "promoted": promote, "reason": reason,
                   "aliases": ["challenger", "champion"] if promote else ["challenger"]})


def _finish(result: dict, config: dict | None, out: Path, metrics_file) -> dict:
    """The decision written to ``out`` whole, and its headline to ``metrics_file`` (what ``dvc exp show`` shows)."""
    result["config"] = config
    write_json_atomic(out, result)
    if metrics_file is not None:
        # the challenger's test mAP is evaluate's; the champion's and the comparison are in ``out``
        write_json_atomic(metrics_file, {"version": result["version"], "gate_passed": int(result["gate_passed"]),
                                         "promoted": int(result["promoted"])})
    verdict = "promoted to champion" if result["promoted"] else "kept as challenger"
    log.debug("register: %s version %s %s: %s", result["model_name"], result["version"], verdict, result["reason"])
    return result


def _test_split(prepared, images):
    """The test split: labels, examples, image root, image paths, the 0/1 matrix, and each image's
    SHA-256 as prepare recorded it (None when some are missing)."""
    labels, test = load_prepared(prepared, "test")
    root = Path(images) if images else image_root_of(prepared)
    test_images = [root / ex.path for ex in test]
    y_test = np.array([ex.flags for ex in test], dtype=int).reshape(len(test), len(labels))
    known = load_hashes(prepared) or {}
    test_hashes = [known.get(ex.path) for ex in test]
    return labels, test, root, test_images, y_test, test_hashes if all(test_hashes) else None
