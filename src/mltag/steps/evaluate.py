"""evaluate: test metrics with intervals and baselines, PR curves, an error-analysis report."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from mltag import config
from mltag import metrics as M
from mltag.data.formats import check_same_labels, load_split, model_mode, read_labels, read_model_meta, write_scores
from mltag.data.integrity import recorded_digest
from mltag.errors import MltagError
from mltag.files import atomic_path, write_json_atomic
from mltag.head.saved import head_scores
from mltag.reports.html import data_uri, figure_png, new_axes, render, thumbnail
from mltag.tracking.runs import RUN_LOG_KEY, for_the_run

log = logging.getLogger(__name__)


def pr_curves_png(y: np.ndarray, s: np.ndarray, labels: list[str], title: str = "precision-recall (test)") -> bytes:
    fig, ax = new_axes((6, 5))
    ap = M.average_precisions(y, s)
    for j, name in enumerate(labels):
        if y[:, j].sum() == 0:
            continue
        p, r, _ = M.precision_recall_curve(y[:, j], s[:, j])
        ax.plot(r, p, label=f"{name} (AP {ap[j]:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return figure_png(fig, dpi=100)


def history_png(history: dict) -> bytes | None:
    """train's loss per epoch (the model folder's ``history.json``) as a picture: what ``dvc plots show``
    draws from ``plots/train_history.json``, but readable offline (DVC's charts load their library from the
    web). None when the history has no loss."""
    loss = history.get("loss") if isinstance(history, dict) else None
    if not loss:
        return None
    fig, ax = new_axes((6, 4))
    epochs = range(1, len(loss) + 1)
    for key, label in (("loss", "train loss"), ("val_loss", "validation loss")):
        if history.get(key):
            ax.plot(epochs, history[key], label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("head training")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return figure_png(fig, dpi=100)


def error_report_html(y, s, thresholds, labels, paths, image_root: Path | None, metrics: dict, pr_png: bytes,
                      worst: int = 4, explainer=None) -> str:
    """HTML: headline table, PR curves, each label's confusion and its worst false positives/negatives
    (with ``explainer``, an ``inference.explain.Explainer``, each with its saliency overlay for that label)."""
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (len(labels),))
    pred = s >= thresholds

    def overlay(i, j):
        png = explainer.overlay(image_root / str(paths[i]), j, 96) if explainer and image_root else None
        return data_uri(png, "image/jpeg") if png else None

    def shown(idx, j):
        return [{"path": str(paths[i]), "score": float(s[i, j]), "label": labels[j], "overlay": overlay(i, j),
                 "thumb": thumbnail(image_root / str(paths[i])) if image_root else None} for i in idx]

    rows = []
    for j, name in enumerate(labels):
        fp = np.where(pred[:, j] & (y[:, j] == 0))[0]
        fn = np.where(~pred[:, j] & (y[:, j] == 1))[0]
        fp = fp[np.argsort(-s[fp, j])][:worst]
        fn = fn[np.argsort(s[fn, j])][:worst]
        rows.append({"name": name, "metrics": metrics["per_label"][name], "threshold": float(thresholds[j]),
                     "worst": [("worst false positives", shown(fp, j)), ("worst false negatives", shown(fn, j))]})
    return render("evaluation.html.j2", m=metrics, rows=rows, pr_png=data_uri(pr_png), saliency=explainer is not None)


def evaluate(model_dir: str | os.PathLike, bottlenecks: str | os.PathLike, out: str | os.PathLike,
             metrics_file: str | os.PathLike, images: str | os.PathLike | None = None, *,
             evaluate: config.Evaluate, plots: str | os.PathLike | None = None, config: dict | None = None) -> dict:
    """Score val and test with the trained head; write metrics, PR curves, scores and a report.

    ``out`` receives ``scores.npz`` (for calibrate), ``pr_curves.png``, ``train_history.png`` (train's loss
    per epoch), ``report.html`` and
    ``details.json`` (every figure: per label, intervals, baselines); ``metrics_file`` the headline
    figures (``headline``: what ``dvc exp show`` puts in its columns); ``plots`` (default ``out/pr``) one ``<label>.csv``
    PR curve per label for ``dvc plots``. ``evaluate.tta`` (``mean``/``max``) scores the test
    images end to end over ten augmented views instead of the cached vectors.

    evaluate opens no MLflow store: ``details.json`` keeps the figures and files for the model's run
    (``tracking.runs.for_the_run``), and register logs them there.
    """
    tta = evaluate.tta
    model_meta = read_model_meta(model_dir)
    labels = model_meta["labels"]
    x_va, y_va, p_va = load_split(bottlenecks, "val")
    x_te, y_te, p_te = load_split(bottlenecks, "test")
    _, y_tr, _ = load_split(bottlenecks, "train")
    if y_te.shape[1] != len(labels):
        raise MltagError(f"the model scores {len(labels)} labels but the bottlenecks hold {y_te.shape[1]}; "
                         "train the model on these bottlenecks", Path(model_dir) / "model.json")
    check_same_labels(read_labels(Path(bottlenecks) / "labels.txt"), labels, Path(model_dir) / "model.json",
                      "the model", "train the model on these bottlenecks (or restore its folder)")
    s_va, s_te, explainer = _scores(model_dir, images, evaluate, x_va, p_va, x_te, p_te)
    result = M.compute(y_te, s_te, 0.5, labels)
    result["tta"] = tta
    result["model_digest"] = recorded_digest(model_dir)  # which model these scores are of (calibrate checks it)
    result["ci95"] = M.bootstrap_ci(y_te, s_te, 0.5, n=evaluate.bootstrap, seed=evaluate.seed)
    result["baselines"] = M.baselines(y_te, y_tr, labels)
    from mltag.data.groups import exactly_one

    result["groups"] = M.group_accuracy(y_te, s_te, labels, exactly_one(model_meta.get("label_groups") or []))
    result["val"] = {k: v for k, v in M.compute(y_va, s_va, 0.5, labels).items() if k != "per_label"}
    result["val"]["seen_in_training"] = bool((model_meta.get("head") or {}).get("refit"))  # train.refit
    png = pr_curves_png(y_te, s_te, labels)

    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_scores(tmp / "scores.npz", val_scores=s_va, val_labels=y_va, val_paths=p_va,
                     test_scores=s_te, test_labels=y_te, test_paths=p_te)
        (tmp / "pr_curves.png").write_bytes(png)
        curve = history_png(_history(model_dir))
        if curve is not None:
            (tmp / "train_history.png").write_bytes(curve)
        write_json_atomic(tmp / "details.json", {**result, RUN_LOG_KEY: _for_the_run(result)})
        (tmp / "config.json").write_text(json.dumps(config or {}, indent=2) + "\n", encoding="utf-8")
        root = Path(images) if images else None
        (tmp / "report.html").write_text(
            error_report_html(y_te, s_te, np.full(len(labels), 0.5), labels, p_te, root, result, png,
                              explainer=explainer),
            encoding="utf-8")
    _write_pr_csvs(plots or out / "pr", labels, y_te, s_te)
    write_json_atomic(metrics_file, headline(result))
    ci = result["ci95"].get("map")
    groups = "".join(f"; {'/'.join(g['labels'][:3])}{'/...' if len(g['labels']) > 3 else ''} accuracy "
                     f"{g['accuracy']:.3f}" for g in result["groups"] if g["accuracy"] is not None)
    log.info("evaluate: test mAP %.3f%s, micro F1 %.3f, macro F1 %.3f (at 0.5)%s; report in %s/report.html",
             result["map"], f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "", result["micro_f1"], result["macro_f1"],
             groups, out)
    return result


def _scores(model_dir, images, evaluate: config.Evaluate, x_va, p_va, x_te, p_te):
    """``(val scores, test scores, explainer or None)``: the head on the cached vectors, or, for a fine-tuned
    model or test-time augmentation, the model end to end on the images."""
    tta = evaluate.tta
    fine_tuned = model_mode(model_dir) == "fine_tune"
    model = None
    if fine_tuned or tta != "none":
        # Augmented views are new pixels, and a fine-tuned backbone no longer produces the
        # cached vectors: score the images end to end.
        if images is None:
            raise MltagError("evaluate needs the image folder (--prepared) for "
                             + ("a fine-tuned model" if fine_tuned else "test-time augmentation"))
        from mltag.inference.model import InferenceModel

        model = InferenceModel(model_dir)
    explainer = None
    if evaluate.saliency and images is not None:
        from mltag.inference.explain import Explainer, explainer_for
        from mltag.inference.model import InferenceModel

        explainer = Explainer(model) if model is not None else explainer_for(model_dir, InferenceModel(model_dir))
    s_va = model.scores([Path(images) / str(p) for p in p_va]) if fine_tuned else head_scores(model_dir, x_va)
    s_te = model.scores([Path(images) / str(p) for p in p_te], tta=tta) if model is not None \
        else head_scores(model_dir, x_te)
    return s_va, s_te, explainer


def _write_pr_csvs(folder, labels: list[str], y: np.ndarray, s: np.ndarray) -> None:
    """One ``<label>.csv`` PR curve per label, for ``dvc plots``."""
    with atomic_path(folder, also=("*.csv",)) as tmp:
        tmp.mkdir(parents=True)
        for j, name in enumerate(labels):
            rows = ["precision,recall,threshold"]
            if y[:, j].sum():
                p, r, t = M.precision_recall_curve(y[:, j], s[:, j])
                rows += [f"{a:.5f},{b:.5f},{c:.5f}" for a, b, c in zip(p[:-1], r[:-1], t)]
            (tmp / f"{name}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def _for_the_run(result: dict) -> dict:
    """The test figures (each label's AP, mAP's interval) and the report, for the model's run."""
    flat = {f"test_{k}": v for k, v in result.items() if isinstance(v, float)}
    flat.update({f"test_ap_{n}": m["ap"] for n, m in result["per_label"].items() if m["ap"] is not None})
    if result["ci95"].get("map"):
        flat["test_map_ci_low"], flat["test_map_ci_high"] = result["ci95"]["map"]
    return for_the_run(flat, {f: "evaluate" for f in ("pr_curves.png", "report.html", "details.json", "config.json")})


def _history(model_dir) -> dict:
    """The model folder's ``history.json`` (train's per-epoch figures), or {} when it has none."""
    f = Path(model_dir) / "history.json"
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def headline(result: dict) -> dict:
    """evaluate's few figures for ``dvc exp show`` and ``dvc metrics diff``: test mAP, micro and macro F1 at 0.5.
    The rest (intervals, per label, baselines) is in ``details.json``."""
    return {"map": result["map"], "micro_f1": result["micro_f1"], "macro_f1": result["macro_f1"]}


def print_table(result: dict, labels: list[str]) -> None:
    ci = result.get("ci95", {})
    base = result.get("baselines", {})

    def fmt(v):
        return "   n/a" if v is None else f"{v:6.3f}"

    print(f"\n{'metric':<16}{'model':>8}{'95% CI':>18}{'all-neg':>9}{'prior':>9}")
    for key in ("map", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss", "label_accuracy", "roc_auc_macro"):
        c = ci.get(key)
        cs = f"[{c[0]:.3f}, {c[1]:.3f}]" if c else ""
        print(f"{key:<16}{fmt(result.get(key)):>8}{cs:>18}{fmt(base.get('all_negative', {}).get(key)):>9}"
              f"{fmt(base.get('label_prior', {}).get(key)):>9}")
    print(f"\n{'label':<16}{'AP':>7}{'P':>7}{'R':>7}{'F1':>7}{'support':>9}")
    for name in labels:
        m = result["per_label"][name]
        print(f"{name:<16}{fmt(m['ap']):>7}{m['precision']:7.3f}{m['recall']:7.3f}{m['f1']:7.3f}{m['support']:9d}")
    print()
