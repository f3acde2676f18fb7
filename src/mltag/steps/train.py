"""train: a sigmoid head on cached bottleneck vectors (``mltag.head.fit``), optionally the backbone's
top blocks too (``mltag.steps.finetune``), saved with the end-to-end model (``mltag.inference.export``).

In head mode nothing here imports TensorFlow: the head is fitted in numpy and the end-to-end
LiteRT file is the backbone's (converted by the bottleneck step) with the head appended."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from mltag import config
from mltag.backbones import builtin as bb
from mltag.data.formats import load_split, load_views, read_bottleneck_meta, read_labels, write_labels
from mltag.data.integrity import write_integrity
from mltag.errors import MltagError, Terminated
from mltag.files import atomic_path, fault_point, write_json_atomic
from mltag.head.fit import best_epoch, check_converged, fit_and_refit, fit_head
from mltag.head.model import HeadLoss, Rows, with_views
from mltag.inference.export import write_model_folder
from mltag.tracking import runs as mltracking

log = logging.getLogger(__name__)


def train(bottlenecks: str | os.PathLike, out: str | os.PathLike, *, train: config.Train, backbone: config.Backbone,
          tracking: config.Tracking, tracking_uri: str | None = None, config: dict | None = None,
          recipe: dict | None = None, progress: bool = True, metrics_file: str | os.PathLike | None = None,
          history_file: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
          dataset: str | None = None, dataset_version: str | None = None,
          exclusive_groups: list | None = None) -> dict:
    """Train the head, save it with the end-to-end model, and open the MLflow run.

    Args:
        train, backbone, tracking: the typed params sections. ``train.mode`` ``fine_tune`` also
            tunes the top ``train.fine_tune_blocks`` blocks of the built-in backbone, from the
            images under ``images`` (see ``mltag.steps.finetune``). ``backbone`` is the backbone the
            caller expects: the model always uses the bottlenecks' own, and a mismatch is logged.
        config: the output-changing values, saved in the model folder (``config.json``).
        recipe: every section's values, logged as the MLflow run's params (default: ``config``).
        metrics_file: also write the summary's headline figures here (DVC metrics).
        history_file: also write per-epoch losses here, one record per epoch (DVC plots).
        dataset: what prepare read (``prepare.input``): names the MLflow experiment (when
            ``tracking.experiment`` is empty) and the run (``mltag.tracking.runs.run_identity``), and is the
            run's MLflow dataset input with ``dataset_version`` (what prepare recorded) as its version.
        exclusive_groups: prepare's exclusive label groups (``label_groups_of``), recorded in ``model.json``
            as ``label_groups``.

    Returns:
        Summary dict with the run id and best validation figures.
    """
    from mltag.inference.engine import require_gpu

    require_gpu("train")
    meta, labels, (x_tr, y_tr, p_tr), (x_va, y_va, p_va), views, resolved = _inputs(bottlenecks, train, backbone,
                                                                                      images)
    x_fit, y_fit = with_views(x_tr, y_tr, views)

    tracker = mltracking.Tracker(tracking_uri)
    t0 = time.time()
    params = {**mltracking.flatten(recipe or config or {}), "train.backbone_id": resolved.backbone_id,
              "train.n_labels": len(labels), "train.n_train": len(x_tr), "train.n_train_vectors": len(x_fit),
              "train.n_val": len(x_va)}
    experiment, identity = mltracking.run_identity(dataset, tracking.experiment)
    tags = {**mltracking.owner_tags(out), **identity}
    try:  # the run ends FINISHED, or FAILED with whatever went wrong (KILLED when stopped, even while it opens)
        # the run exists (or a dead store is reported) before the fit, fine-tuning's minutes and any write
        run_id, experiment_id = tracker.open_train_run(
            experiment, str(out), tags, {k: str(v)[:500] for k, v in params.items()},
            {"mltag.labels": ",".join(labels)}, (dataset, dataset_version) if dataset else None)
        loss = HeadLoss.of(train.model_dump())
        head, history, mon, refit = _fit(train, loss, x_fit, y_fit, x_tr, y_tr, x_va, y_va, views, progress, p_tr)
        best = best_epoch(history, mon) - 1
        fault_point("train:fitting")
        net, ft = None, None
        if train.mode == "fine_tune":
            net, head.weights, ft = _fine_tune(meta, images, p_tr, y_tr, p_va, y_va, head.weights, train, progress,
                                               backbone.cache_dir)
        series = {f"epoch_{k}": v for k, v in history.items()}
        if ft is not None:
            series.update({f"fine_tune_{k}": ft[k] for k in ("loss", "val_loss", "val_map")})
        tracker.log_to_run(run_id, series=series)
        summary = _summary(run_id, history, mon, best, time.time() - t0, train.mode, refit, ft)
        tracker.log_to_run(run_id, metrics={f"train_{k}": v for k, v in summary.items() if isinstance(v, float)})
        model_meta = _model_meta(labels, meta, resolved, int(x_tr.shape[1]), train, loss, best, refit, ft)
        model_meta["label_groups"] = _known_groups(exclusive_groups or [], labels)
        out = Path(out)
        digest = _write_model(out, head.weights, resolved, net, model_meta, backbone.cache_dir, labels, history, ft,
                              config, summary, (run_id, experiment_id, tracker.uri, experiment))
        tracker.log_to_run(run_id, tags={mltracking.MODEL_DIGEST_TAG: digest})
        _write_dvc_files(metrics_file, history_file, summary, history, mon)
        if ft is not None and ft.get("checkpoint"):  # the model is written: nothing left to resume
            from mltag.steps.finetune import remove_checkpoint

            remove_checkpoint(ft["checkpoint"])
        tracker.log_to_run(run_id, artifacts=[(str(out / "history.json"), None), (str(out / "config.json"), None)])
        tracker.end_run("FINISHED")
    except BaseException as e:  # stopped (Ctrl-C, SIGTERM): KILLED, as MLflow names a run ended from outside
        tracker.abandon("KILLED" if isinstance(e, (KeyboardInterrupt, Terminated)) else "FAILED")
        raise
    return summary


def _inputs(bottlenecks, train: config.Train, backbone: config.Backbone, images):
    """The bottleneck folder's vectors, labels and backbone, checked: ``(meta, labels, (x, y, paths) of train and of
    val, the train views, the resolved backbone)``."""
    meta = read_bottleneck_meta(bottlenecks)
    _check_inputs(bottlenecks, meta, train, backbone, images)
    labels = read_labels(Path(bottlenecks) / "labels.txt")
    tr, va = load_split(bottlenecks, "train"), load_split(bottlenecks, "val")
    if len(tr[0]) == 0:
        raise MltagError("the train split is empty", Path(bottlenecks) / "train.npz")
    resolved = bb.with_precision(bb.resolve(meta["backbone_handle"], backbone.cache_dir), meta.get("precision", "fp32"))
    if resolved.backbone_id != meta["backbone_id"]:
        raise MltagError(f"backbone changed since the bottleneck step ({meta['backbone_id']} -> "
                         f"{resolved.backbone_id}); rerun bottleneck")
    return meta, labels, tr, va, load_views(bottlenecks, "train"), resolved


def _write_dvc_files(metrics_file, history_file, summary: dict, history: dict, mon: str) -> None:
    """DVC's files: the summary's headline figures (summary.json in the model folder has the rest: run id,
    seconds...) and one record per epoch for ``dvc plots``."""
    if metrics_file:
        write_json_atomic(metrics_file, {k: summary[k] for k in HEADLINE if summary.get(k) is not None})
    if history_file:
        write_json_atomic(history_file, [{"epoch": i + 1, **{k: v[i] for k, v in history.items()}}
                                         for i in range(len(history[mon]))])


def _write_model(out: Path, weights, resolved, net, model_meta: dict, backbone_cache, labels: list[str],
                 history: dict, ft: dict | None, config: dict | None, summary: dict, run: tuple) -> str:
    """The model folder, whole or not at all: weights, the end-to-end model, labels, history, config, summary,
    the run reference and the content hash (returned)."""
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_model_folder(tmp, weights, resolved, net, model_meta, backbone_cache)
        write_labels(tmp / "labels.txt", labels)
        _write_json(tmp / "history.json",
                    history if ft is None else {**history,
                                                "fine_tune": {k: ft[k] for k in ("loss", "val_loss", "val_map")}})
        _write_json(tmp / "config.json", config or {})
        _write_json(tmp / "summary.json", summary)
        run_id, experiment_id, uri, experiment = run
        mltracking.save_run_ref(tmp, run_id, experiment_id, uri, experiment)
        return write_integrity(tmp)


def _check_inputs(bottlenecks, meta: dict, train: config.Train, backbone: config.Backbone, images) -> None:
    """Say once when the bottlenecks were made with another backbone than asked; fail fine-tuning's
    missing inputs before any work."""
    for key, want in (("backbone_handle", backbone.handle), ("image_size", backbone.image_size)):
        if want and str(meta.get(key)) != str(want):  # train follows the bottlenecks; say so once
            log.warning("train: the bottlenecks in %s were computed with %s %r, not backbone.%s %r; training on "
                        "them (rerun the bottleneck step for %r)", bottlenecks, key, meta.get(key),
                        key.replace("backbone_", ""), want, want)
    if train.mode == "fine_tune":
        from mltag.steps.finetune import builtin_name

        builtin_name(meta["backbone_handle"])
        if meta.get("precision", "fp32") != "fp32":
            raise MltagError("train.mode fine_tune trains the backbone in float: compute the bottlenecks with "
                             "backbone.precision fp32", Path(bottlenecks) / "bottleneck.json")
        if images is None or not Path(images).is_dir():
            raise MltagError("train.mode fine_tune reads the images: pass the prepared folder (--prepared)", images)


def _fit(train: config.Train, loss: HeadLoss, x_fit, y_fit, x_tr, y_tr, x_va, y_va, views, progress: bool,
         paths=None):
    """The head on the cached vectors. With ``train.refit`` (head mode, validation data), the shipped head
    is the same one fitted afresh on train+val for the epoch count validation chose.

    Returns:
        ``(head, history, monitored key, whether it was refitted)``.
    """
    settings = {"learning_rate": train.learning_rate, "batch_size": train.batch_size,
                "hidden_units": train.hidden_units, "dropout": train.dropout, "seed": train.seed, "loss": loss}
    if train.label_trust > 0 and len(x_tr) >= 2 * TRUST_FOLDS:
        y_tr = _trusted_targets(train, settings, x_fit, x_tr, y_tr, x_va, y_va, paths, progress)
        y_fit = np.concatenate([y_tr] + ([np.repeat(y_tr, x_fit.k, axis=0)] if x_fit.k else []))
    refit = train.refit and train.mode == "head" and len(x_va) > 0
    if refit:
        rows = Rows(np.concatenate([x_tr, x_va]), views, None, np.arange(len(x_tr)))
        y_all = np.concatenate([y_tr, y_va] + ([np.repeat(y_tr, rows.k, axis=0)] if rows.k else []))
        first, history, mon, head = fit_and_refit(x_fit, y_fit, x_va, y_va, rows, y_all, epochs=train.epochs,
                                                  patience=train.patience, monitor=train.monitor,
                                                  progress=progress, **settings)
        check_converged(first, history, train.learning_rate)  # a fit that diverged at once left no refit
    else:
        head, history, mon = fit_head(x_fit, y_fit, x_va, y_va, epochs=train.epochs, patience=train.patience,
                                      monitor=train.monitor, progress=progress, **settings)
    check_converged(head, history, train.learning_rate)
    return head, history, mon, refit


TRUST_FOLDS = 5


def _trusted_targets(train: config.Train, settings: dict, x_fit, x_tr, y_tr, x_va, y_va, paths,
                     progress: bool) -> np.ndarray:
    """``train.label_trust``: the training targets moved toward out-of-fold scores. A first fit on the train
    split (stopped on val) sets the epoch count; TRUST_FOLDS heads, each fitted on the other folds of the train
    split only (folds by image path, an image's views in its fold), score the images they never saw; each
    target becomes ``y + label_trust * (score - y)``. Val and test are never touched."""
    from mltag.head.fit import fit_fold_heads
    from mltag.head.folds import assign_folds

    _, history, mon = fit_head(x_fit, np.concatenate([y_tr] + ([np.repeat(y_tr, x_fit.k, axis=0)] if x_fit.k else [])),
                               x_va, y_va, epochs=train.epochs, patience=train.patience, monitor=train.monitor,
                               progress=False, **settings)
    epochs = best_epoch(history, mon)
    names = [str(p) for p in paths] if paths is not None else [str(i) for i in range(len(x_tr))]
    folds = assign_folds(names, TRUST_FOLDS)
    row_fold = np.concatenate([folds] + ([np.repeat(folds, x_fit.k)] if x_fit.k else []))
    y_rows = np.concatenate([y_tr] + ([np.repeat(y_tr, x_fit.k, axis=0)] if x_fit.k else []))
    heads = fit_fold_heads(x_fit, y_rows, row_fold, TRUST_FOLDS, epochs=epochs, **{**settings, "seed": train.seed + 1})
    scores = np.zeros(y_tr.shape, np.float32)
    for f, head in enumerate(heads):
        scores[folds == f] = head.predict(np.asarray(x_tr[folds == f], np.float32))
    y_tr = np.asarray(y_tr, np.float32)
    moved = np.abs(scores - y_tr) > 0.5
    log.info("train: label_trust %.2f: %d of %d training labels contradicted out of fold (%d epochs, %d heads)",
             train.label_trust, int(moved.sum()), y_tr.size, epochs, TRUST_FOLDS)
    return (y_tr + train.label_trust * (scores - y_tr)).astype(np.float32)


HEADLINE = ("best_epoch", "val_loss", "fine_tune_val_loss")


def _summary(run_id: str, history: dict, mon: str, best: int, seconds: float, mode: str, refit: bool,
             ft: dict | None) -> dict:
    """train's summary (``summary.json``, DVC metrics): the best epoch's figures, and fine-tuning's."""
    n = len(history[mon])
    summary = {
        "run_id": run_id,
        "epochs_run": n,
        "best_epoch": best + 1,
        "train_loss": history["loss"][best],
        "val_loss": history.get("val_loss", [None] * n)[best],
        "val_map_pr_auc": history.get("val_map", [None] * n)[best],
        "seconds": round(seconds, 2),
        "mode": mode,
        "refit": refit,
    }
    if ft is not None:
        summary.update({"fine_tune_best_epoch": ft["best_epoch"], "fine_tune_epochs_run": len(ft["loss"]),
                        "fine_tune_val_loss": ft["val_loss"][ft["best_epoch"] - 1] if ft["val_loss"] else None,
                        "fine_tune_val_map": ft["val_map"][ft["best_epoch"] - 1] if ft["val_map"] else None,
                        "fine_tune_seconds": ft["seconds"]})
    return summary


def _model_meta(labels: list[str], meta: dict, resolved, feature_dim: int, train: config.Train, loss: HeadLoss,
                best: int, refit: bool, ft: dict | None) -> dict:
    """``model.json``: what every loader of the model folder needs, and what calibrate refits on folds."""
    model_meta = {
        "labels": labels, "image_size": meta["image_size"], "backbone_handle": meta["backbone_handle"],
        "backbone_id": resolved.backbone_id, "precision": meta.get("precision", "fp32"),
        "preprocessing": meta["preprocessing"], "feature_dim": feature_dim, "hidden_units": train.hidden_units,
        # what calibrate needs to refit the same head on folds
        "head": {"learning_rate": train.learning_rate, "epochs": train.epochs, "batch_size": train.batch_size,
                 "hidden_units": train.hidden_units, "dropout": train.dropout, "seed": train.seed,
                 "best_epoch": best + 1, "views": int(meta.get("views", 1)), "refit": refit, **loss.settings()},
        # fine_tune: cached vectors no longer match the backbone; evaluate scores images end to end
        "mode": train.mode,
    }
    if ft is not None:
        model_meta["fine_tune"] = {
            "blocks": train.fine_tune_blocks, "tuned_blocks": ft["tuned_blocks"],
            "learning_rate": train.fine_tune_learning_rate, "epochs": train.fine_tune_epochs,
            "patience": train.fine_tune_patience, "best_epoch": ft["best_epoch"], "bn": train.fine_tune_bn,
            "mixed_precision": ft["mixed_precision"]}
    return model_meta


def _known_groups(groups: list[list[str]], labels: list[str]) -> list[list[str]]:
    """prepare's exclusive label groups, recorded in model.json: each must name labels the model scores."""
    from mltag.data.groups import names_of

    for g in groups:
        unknown = [n for n in names_of(g) if n not in labels]
        if unknown:
            raise MltagError(f"the prepared dataset's label groups name label(s) these bottlenecks do not have: "
                             f"{', '.join(unknown)}; run prepare and bottleneck again")
    return [dict(g) if isinstance(g, dict) else list(g) for g in groups]


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _fine_tune(meta: dict, images, p_tr, y_tr, p_va, y_va, head_weights, train: config.Train, progress: bool,
               backbone_cache):
    """Run ``finetune.fine_tune`` on the train and val images (paths as listed in the bottleneck folder)."""
    from mltag.inference.lanes import hash_files
    from mltag.steps.finetune import fine_tune

    items = {}
    for split, paths in (("train", p_tr), ("val", p_va)):
        files = [Path(images) / str(p) for p in paths]
        for f in files:
            if not f.is_file():
                raise MltagError("image not found (train.mode fine_tune reads the images)", f)
        items[split] = list(zip(files, hash_files(files)))
    return fine_tune(meta["backbone_handle"], int(meta["image_size"]), items["train"], y_tr, items["val"], y_va,
                     head_weights, train=train, views=int(meta.get("views", 1)), progress=progress,
                     backbone_cache=backbone_cache, checkpoints=train.checkpoint_dir or None)
