"""The model card of a registered version (after Mitchell et al. 2019): what the model is, what it was
trained and tested on, how well it does with intervals, how it decides, and why it was (not) promoted.

One structure, written as Markdown and as one self-contained HTML page (every value escaped).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from mltag import metrics as M

INTENDED_USE = (
    "Tags photos like those it was trained on with the labels listed below; each label is decided on its own "
    "(a photo may get several labels, or, with the at-least-one rule, its most likely one). Meant to assist "
    "people who check its output, or for bulk tagging where the per-label precision and recall below are "
    "acceptable.")
LIMITS = (
    "It knows only these labels, and only photos like the training photos: check `mltag drift` or a labelled "
    "sample before trusting it on another source. The figures come from one test split: the intervals say how "
    "far they could move on another one. Labels with few test examples have wide intervals.")


def card_sections(*, model_name: str, version, run_id: str | None, content_hash: str, meta: dict,
                  dataset: dict, split_sizes: dict, label_counts: dict, labels: list[str], y_test: np.ndarray,
                  scores: np.ndarray, thresholds: dict, parity: dict | None, decision: dict,
                  bootstrap: int) -> list[tuple[str, list[str], list[list[str]] | None]]:
    """The card as ``(title, paragraphs, table rows or None)`` sections; a table's first row is its header."""
    t, min_labels, groups = M.decision_rule(thresholds, labels)
    m = M.compute(y_test, scores, t, labels, min_labels, groups) if len(y_test) else None
    ci = M.bootstrap_ci(y_test, M.decide(scores, t, min_labels, groups), 0.5, n=bootstrap) if len(y_test) > 1 else {}
    ci_map = M.bootstrap_ci(y_test, scores, t, n=bootstrap).get("map") if len(y_test) > 1 else None
    head = meta.get("head", {})
    few = [lb for lb in labels if label_counts.get(lb, {}).get("test", 0) < 10]

    def interval(v):
        return f" [{v[0]:.3f}, {v[1]:.3f}]" if v else ""

    sections = [
        ("Model", [f"Registered model `{model_name}`, version {version}; MLflow run `{run_id or 'n/a'}`; content "
                   f"hash `{content_hash[:16]}`."], None),
        ("Intended use", [INTENDED_USE], None),
        ("Data", [f"Source `{dataset.get('source', 'n/a')}`" + (f", version `{dataset['dataset_version']}`"
                  if dataset.get("dataset_version") else "") + "; images per split: " +
                  ", ".join(f"{s} {n}" for s, n in split_sizes.items()) + "."],
         [["label", *split_sizes]] + [[lb, *(str(label_counts.get(lb, {}).get(s, 0)) for s in split_sizes)]
                                      for lb in labels]),
        ("Training recipe", [
            f"Backbone `{meta.get('backbone_handle')}` at {meta.get('image_size')} px ({meta.get('mode', 'head')} mode); "
            f"{head.get('views', 1)} view(s) per training image; head: {head.get('hidden_units', 0)} hidden units, "
            f"learning rate {head.get('learning_rate')}, best epoch {head.get('best_epoch')} of {head.get('epochs')}, "
            f"dropout {head.get('dropout')}, refit on train+val: {'yes' if head.get('refit') else 'no'}."], None),
    ]
    if m is not None:
        sections.append(("Test metrics", [
            f"On {len(y_test)} test images, at the calibrated thresholds; 95% bootstrap intervals over "
            f"{bootstrap} resamples: mAP {m['map']:.3f}{interval(ci_map)}, micro F1 {m['micro_f1']:.3f}"
            f"{interval(ci.get('micro_f1'))}, macro F1 {m['macro_f1']:.3f}."],
            [["label", "test positives", "AP", "precision", "recall", "F1", "threshold"]] +
            [[lb, str(int(y_test[:, j].sum())), _num(m["per_label"][lb].get("ap")),
              _num(m["per_label"][lb].get("precision")), _num(m["per_label"][lb].get("recall")),
              _num(m["per_label"][lb].get("f1")), f"{float(t[j]):.3f}"] for j, lb in enumerate(labels)]))
    sections.append(("How it decides", [
        f"Per-label thresholds from calibrate ({thresholds.get('fitted_on', 'n/a')}); "
        + ("an image with no label over its threshold gets its most likely one (at-least-one rule)."
           if min_labels else "an image may get no label (no at-least-one rule).")], None))
    if parity:
        sections.append(("LiteRT and int8", [
            f"`model.tflite` (fp32) against the evaluated scores: largest difference "
            f"{_num(parity.get('fp32_max_abs_diff_vs_evaluated', parity.get('fp32_max_abs_diff_vs_savedmodel')), 6)}. "
            f"Quantized: {parity.get('int8_reason') or parity.get('error', 'n/a')}."], None))
    comp = decision.get("comparison") or {}
    rows = None
    if comp.get("d_ap"):
        rows = [["label", "ΔAP", "95% interval"]] + [
            [lb, f"{d[0]:+.3f}", f"[{d[1]:+.3f}, {d[2]:+.3f}]"] if d else [lb, "n/a", ""]
            for lb, d in comp["d_ap"].items()]
    sections.append(("Promotion", [
        ("Promoted to champion" if decision.get("promoted") else "Kept as challenger") + ": " +
        str(decision.get("reason", "")) + (f" (against version {decision['champion_version']})"
                                           if decision.get("champion_version") else "") + "."], rows))
    sections.append(("Label review", [
        "Likely label errors are ranked by `mltag review` beside register (`reports/review/label_issues.csv`, "
        "`reports/review/details.json`); they never gate promotion."], None))
    sections.append(("Known limits", [LIMITS] + ([f"Fewer than 10 test examples: {', '.join(few)}."] if few else []),
                     None))
    return sections


def _num(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{float(v):.{digits}f}"


def to_markdown(title: str, sections) -> str:
    out = [f"# {title}", ""]
    for name, paragraphs, rows in sections:
        out += [f"## {name}", ""]
        for p in paragraphs:
            out += [p, ""]
        if rows:
            out.append("| " + " | ".join(rows[0]) + " |")
            out.append("|" + "---|" * len(rows[0]))
            out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
            out.append("")
    return "\n".join(out)


def to_html(title: str, sections) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    for name, paragraphs, rows in sections:
        body.append(f"<h2>{e(name)}</h2>")
        body += [f"<p>{e(p).replace('`', '')}</p>" for p in paragraphs]
        if rows:
            body.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in rows[0]) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows[1:]]
            body.append("</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:left}")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_card(path: str | Path, title: str, sections) -> tuple[Path, Path]:
    """``path`` (Markdown) and the same name with ``.html``, each written whole."""
    from mltag.files import write_text_atomic

    md = Path(path)
    page = md.with_suffix(".html")
    write_text_atomic(md, to_markdown(title, sections))
    write_text_atomic(page, to_html(title, sections))
    return md, page


def log_card(client, result: dict, meta: dict, prepared, labels: list[str], y_test: np.ndarray,
                scores: np.ndarray, thresholds: Path, parity: dict | None, register, card) -> None:
    """The version's model card: logged with its run (``model_card/``), its decision as the version's
    description, and written to ``card`` when given."""
    import mlflow

    from mltag.data.formats import load_prepared, read_thresholds
    from mltag.data.handoff import read_handoff

    splits = {s: load_prepared(prepared, s)[1] for s in ("train", "val", "test")}
    counts = {lb: {s: int(sum(ex.flags[j] for ex in exs)) for s, exs in splits.items()} for j, lb in enumerate(labels)}
    sections = card_sections(
        model_name=result["model_name"], version=result["version"], run_id=result.get("run_id"),
        content_hash=result["content_hash"], meta=meta,
        dataset=read_handoff(Path(prepared) / "dataset.json", "dataset.json", "prepare"),
        split_sizes={s: len(exs) for s, exs in splits.items()}, label_counts=counts, labels=labels, y_test=y_test,
        scores=scores, thresholds=read_thresholds(thresholds, labels), parity=parity, decision=result,
        bootstrap=register.bootstrap)
    title = f"Model card: {result['model_name']} " + (f"version {result['version']}" if result["version"] is not None
                                                      else "(not registered: a DVC experiment)")
    mlflow.log_text(to_markdown(title, sections), "model_card/model_card.md")
    mlflow.log_text(to_html(title, sections), "model_card/model_card.html")
    if result["version"] is not None:
        client.update_model_version(result["model_name"], str(result["version"]),
                                        description=f"{'Promoted' if result['promoted'] else 'Kept'}: {result['reason']}. "
                                                "Model card: the run's model_card/model_card.md")
    if card:
        write_card(card, title, sections)
