"""``mltag drift``: do new photos still look like the training photos, and do the model's decisions on them
shift?

What the model sees: the new images' vectors (from the vector store, through the backbone the model was
trained with) against the training vectors, by a two-sample test: the maximum mean discrepancy (MMD) with
an RBF kernel on the vectors' leading principal components, and a permutation p-value (the images'
origins shuffled, the kernel matrix computed once). A domain classifier's cross-validated AUC says how big
a difference is (0.5: none). What the model decides: each label's positive rate on the new images against
the test split's, and the two score distributions (Kolmogorov-Smirnov).

Writes ``drift.json`` and ``drift.html`` (the test, the per-label shifts as a plot, the most atypical new
images as thumbnails); the CLI exits 3 when drift is found, so that a scheduler can act.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from mltag.errors import MltagError

log = logging.getLogger(__name__)


def unlike_training(train: np.ndarray, held_out: np.ndarray, new: np.ndarray, quantile: float = 0.05,
                    max_ref: int = 5000, seed: int = 0) -> dict:
    """The effect size a person can judge: the share of new images that look less like the training images
    than all but ``quantile`` of the held-out test images do (each image's cosine similarity to its nearest
    training vector; the training side subsampled to ``max_ref``). Without drift the share is about ``quantile``.

    Returns ``{"share", "expected", "similarity_cut"}`` (``share`` None without held-out or new vectors).
    """
    def unit(x):
        x = np.asarray(x, np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    if not len(held_out) or not len(new) or not len(train):
        return {"share": None, "expected": quantile, "similarity_cut": None}
    ref = unit(train)
    if len(ref) > max_ref:
        ref = ref[np.random.default_rng(seed).choice(len(ref), max_ref, replace=False)]

    def nearest(x):
        return np.concatenate([(unit(x[i: i + 512]) @ ref.T).max(axis=1) for i in range(0, len(x), 512)])

    cut = float(np.quantile(nearest(held_out), quantile))
    return {"share": float((nearest(new) < cut).mean()), "expected": quantile, "similarity_cut": cut}


def mmd_test(ref: np.ndarray, new: np.ndarray, permutations: int = 500, dims: int = 32, max_n: int = 1000,
             seed: int = 0) -> dict:
    """Two-sample MMD test of ``new`` against ``ref`` (rows are vectors). Each side is subsampled to
    ``max_n`` rows; both are projected on ``ref``'s first ``dims`` principal components and scaled by its
    spread; the kernel is RBF with the median pairwise distance as bandwidth.

    Returns:
        ``{"mmd2", "p_value", "auc", "n_reference", "n_new", "permutations", "witness"}``; ``witness`` is each
        (subsampled) new row's mean kernel similarity to the reference rows, lowest = most atypical, and
        ``new_index`` maps those rows back to ``new``.
    """
    rng = np.random.default_rng(seed)
    ref, new = np.asarray(ref, np.float64), np.asarray(new, np.float64)
    if len(ref) < 5 or len(new) < 5:
        raise MltagError(f"drift needs at least 5 reference and 5 new images, got {len(ref)} and {len(new)}")
    ri = rng.choice(len(ref), min(max_n, len(ref)), replace=False)
    ni = np.sort(rng.choice(len(new), min(max_n, len(new)), replace=False))
    a, b = ref[ri], new[ni]
    # The projection is fitted on both sides pooled: symmetric in the two, so shuffling the origins keeps the
    # test exact (fitted on the reference alone, the reference would look tighter than any new sample).
    pooled = np.concatenate([a, b])
    mean = pooled.mean(axis=0)
    _, sv, vt = np.linalg.svd(pooled - mean, full_matrices=False)
    k = min(dims, vt.shape[0])
    scale = sv[:k] / np.sqrt(max(len(pooled) - 1, 1))
    x = ((pooled - mean) @ vt[:k].T) / np.maximum(scale, 1e-12)
    sq = np.sum(x * x, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    bandwidth = np.median(d2[np.triu_indices(len(x), 1)])
    kmat = np.exp(-d2 / max(bandwidth, 1e-12))
    na, nb = len(a), len(b)

    def mmd2(masks: np.ndarray) -> np.ndarray:  # masks [N, P]: True = reference side
        m = masks.astype(np.float64)
        km = kmat @ m
        saa = np.einsum("np,np->p", m, km) - na  # without the diagonal (k(x, x) = 1)
        sbb = np.einsum("np,np->p", 1 - m, kmat @ (1 - m)) - nb
        sab = np.einsum("np,np->p", 1 - m, km)
        return saa / (na * (na - 1)) + sbb / (nb * (nb - 1)) - 2 * sab / (na * nb)

    observed = float(mmd2(np.r_[np.ones(na, bool), np.zeros(nb, bool)][:, None])[0])
    perms = np.zeros((na + nb, permutations), bool)
    for p in range(permutations):
        perms[rng.permutation(na + nb)[:na], p] = True
    null = mmd2(perms)
    p_value = float((1 + np.sum(null >= observed)) / (1 + permutations))
    witness = kmat[na:, :na].mean(axis=1)
    return {"mmd2": observed, "p_value": p_value, "auc": _domain_auc(x, na, seed), "n_reference": na, "n_new": nb,
            "permutations": permutations, "null_mmd2": null.tolist(), "witness": witness.tolist(),
            "new_index": ni.tolist()}


def _domain_auc(x: np.ndarray, na: int, seed: int) -> float:
    """Cross-validated AUC of a logistic regression telling new rows from reference rows: 0.5 when they
    cannot be told apart, 1.0 when always."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    y = np.r_[np.zeros(na), np.ones(len(x) - na)]
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    p = cross_val_predict(LogisticRegression(max_iter=1000), x, y, cv=folds, method="predict_proba")[:, 1]
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p))
    ranks[order] = np.arange(1, len(p) + 1)
    pos = y == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def label_shifts(labels: list[str], ref_scores: np.ndarray, new_scores: np.ndarray, thresholds: np.ndarray,
                 min_labels: int, alpha: float, groups=()) -> list[dict]:
    """Per label: positive rate at the thresholds on the reference (test split) and the new images, with a
    two-proportion z-test p-value, and the Kolmogorov-Smirnov statistic of the two score distributions."""
    from scipy.stats import ks_2samp, norm

    from mltag.metrics import decide

    ra, rb = decide(ref_scores, thresholds, min_labels, groups), decide(new_scores, thresholds, min_labels, groups)
    out = []
    for j, lb in enumerate(labels):
        pa, pb = ra[:, j].mean(), rb[:, j].mean()
        pooled = (ra[:, j].sum() + rb[:, j].sum()) / (len(ra) + len(rb))
        se = np.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / len(ra) + 1 / len(rb)))
        p = float(2 * norm.sf(abs(pb - pa) / se))
        ks = ks_2samp(ref_scores[:, j], new_scores[:, j])
        out.append({"label": lb, "rate_reference": float(pa), "rate_new": float(pb), "rate_p_value": p,
                    "ks": float(ks.statistic), "ks_p_value": float(ks.pvalue),
                    "shifted": bool(p < alpha / len(labels))})  # Bonferroni over the labels
    return out


def drift(model: str, images: list[str], out: str | os.PathLike, *, bottlenecks: str | os.PathLike, store: str,
          backbone_cache_dir: str = "", engine: str = "auto", alpha: float = 0.01, permutations: int = 500,
          max_images: int = 1000, tracking_uri: str | None = None, progress: bool = True) -> dict:
    """Compare ``images`` with the training vectors in ``bottlenecks`` (the model's bottleneck folder);
    write ``out/drift.json`` and ``out/drift.html``. ``drift`` in the result is True when the vectors'
    two-sample test or a label's positive rate says the new images differ (p below ``alpha``)."""
    from mltag.data.formats import load_split, read_bottleneck_meta, read_model_meta, read_thresholds
    from mltag.data.listing import expand_images
    from mltag.files import atomic_path
    from mltag.head.saved import head_scores
    from mltag.inference.vectors import vectors_for
    from mltag.metrics import decision_rule
    from mltag.tracking import runs as tracking

    if not 0 < alpha < 1:
        raise MltagError(f"--alpha must be in (0, 1), got {alpha}")
    folder = tracking.local_model(model, tracking_uri)
    meta = read_model_meta(folder)
    labels = meta["labels"]
    bn = read_bottleneck_meta(bottlenecks)
    if bn.get("backbone_id") != meta.get("backbone_id") or int(bn["image_size"]) != int(meta["image_size"]):
        raise MltagError(f"these bottlenecks were made with {bn.get('backbone_id')} at {bn.get('image_size')} px, "
                         f"the model with {meta.get('backbone_id')} at {meta.get('image_size')} px: give the "
                         "model's own bottleneck folder", bottlenecks)
    files = [Path(p) for p in expand_images(images)[0]]
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise MltagError("image not found", missing[0])
    new, computed = vectors_for(files, meta, store, backbone_cache_dir, engine, progress)
    x_train, _, _ = load_split(bottlenecks, "train")
    x_test, _, _ = load_split(bottlenecks, "test")
    test = mmd_test(np.asarray(x_train, np.float32), new, permutations=permutations, max_n=max_images)
    th_file = folder / "thresholds.json" if (folder / "thresholds.json").is_file() else folder.parent / "thresholds.json"
    thresholds, min_labels, groups = decision_rule(read_thresholds(th_file, labels) if th_file.is_file() else None,
                                                   labels)
    shifts = None
    if meta.get("mode", "head") == "head" and len(x_test):
        shifts = label_shifts(labels, head_scores(folder, np.asarray(x_test, np.float32)),
                              head_scores(folder, new), thresholds, min_labels, alpha, groups)
    found = test["p_value"] < alpha or any(s["shifted"] for s in shifts or [])
    unlike = unlike_training(x_train, x_test, new)
    order = np.argsort(test["witness"])[:12]
    atypical = [{"path": str(files[test["new_index"][i]]), "similarity": float(test["witness"][i])} for i in order]
    result = {"drift": bool(found), "alpha": alpha, "images": len(files), "computed": computed,
              "model": model, "model_folder": str(folder), "labels": labels, "unlike_training": unlike,
              "vectors": {k: test[k] for k in ("mmd2", "p_value", "auc", "n_reference", "n_new", "permutations")},
              "label_shifts": shifts, "most_atypical": atypical}
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        import json

        (tmp / "drift.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (tmp / "drift.html").write_text(_html(result, test["null_mmd2"]), encoding="utf-8")
    log.debug("drift: %s (vectors: MMD p=%.4f, domain AUC %.3f; %d of %d labels' positive rates shifted); %s",
             "found" if found else "none found", test["p_value"], test["auc"],
             sum(s["shifted"] for s in shifts or []), len(labels), out / "drift.html")
    return result


def _html(result: dict, null: list[float]) -> str:
    from mltag.reports.html import data_uri, figure_png, new_axes, render, thumbnail

    fig, ax = new_axes((5.5, 2.6))
    ax.hist(null, bins=30, color="#999", label="shuffled origins")
    ax.axvline(result["vectors"]["mmd2"], color="#c00", label="new vs training")
    ax.set_xlabel("MMD²")
    ax.legend(fontsize=8)
    test_png = data_uri(figure_png(fig))
    rates_png = None
    if result["label_shifts"]:
        fig, ax = new_axes((1.5 + 0.7 * len(result["labels"]), 2.8))
        xs = np.arange(len(result["labels"]))
        ax.bar(xs - 0.2, [s["rate_reference"] for s in result["label_shifts"]], 0.4, label="test split")
        ax.bar(xs + 0.2, [s["rate_new"] for s in result["label_shifts"]], 0.4, label="new images")
        ax.set_xticks(xs, result["labels"], rotation=45, ha="right")
        ax.set_ylabel("positive rate")
        ax.legend(fontsize=8)
        rates_png = data_uri(figure_png(fig))
    atypical = [{**a, "thumb": thumbnail(Path(a["path"]))} for a in result["most_atypical"]]
    return render("drift.html.j2", r=result, test_png=test_png, rates_png=rates_png, atypical=atypical)
