"""register's gate: whether a challenger replaces the champion, decided on the same test images.

The champion is re-scored on the current test split (never trusting old tags): from the cached test vectors
with its own head when it shares the challenger's backbone, else end to end through its registered pyfunc.
``paired_gate`` (the default) promotes only when a paired bootstrap says the challenger is better beyond the
noise; ``gate`` compares the two mAPs as numbers.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import numpy as np

from mltag import config
from mltag import metrics as M
from mltag.data.formats import read_thresholds
from mltag.errors import MltagError

log = logging.getLogger(__name__)
MEMO_CHUNK = 256  # images sent to a champion's pyfunc at once


def gate(challenger_ap: np.ndarray, champion_ap: np.ndarray, labels: list[str], margin: float,
         max_label_ap_drop: float) -> tuple[bool, str]:
    """Decide promotion from per-label APs on the same test split; return (promote, reason)."""
    ch, cp = float(np.nanmean(challenger_ap)), float(np.nanmean(champion_ap))
    drops = {n: float(b - a) for n, a, b in zip(labels, challenger_ap, champion_ap) if np.isfinite(a) and np.isfinite(b)}
    worst = max(drops, key=drops.get) if drops else None
    if worst is not None and drops[worst] > max_label_ap_drop:
        return False, (f"label {worst!r} AP drops {drops[worst]:.4f} (> max_label_ap_drop {max_label_ap_drop}) "
                       f"vs the champion")
    if ch <= cp + margin:
        return False, f"test mAP {ch:.4f} does not beat the champion's {cp:.4f} by more than margin {margin}"
    return True, f"test mAP {ch:.4f} beats the champion's {cp:.4f} by more than margin {margin}"


def _fmt(d: list[float] | None) -> str:
    return "n/a" if d is None else f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"


def paired_gate(paired: dict, labels: list[str], confidence: float, margin: float,
                max_label_ap_drop: float) -> tuple[bool, str]:
    """Promote when the challenger is better with ``confidence``: the lower end of ΔmAP's interval (a paired
    bootstrap on the same test images) is above ``margin``; and refuse when a label is worse by more than
    ``max_label_ap_drop`` with that confidence (the upper end of its ΔAP interval below ``-max_label_ap_drop``).
    A difference inside the noise promotes nothing. Returns ``(promote, the sentence that says why)``."""
    level = f"{confidence:.0%} confidence"
    worse = [(lb, d) for lb, d in zip(labels, paired["per_label"]) if d is not None and d[2] < -max_label_ap_drop]
    if worse:
        lb, d = min(worse, key=lambda x: x[1][0])
        return False, (f"label {lb!r} AP {_fmt(d)}: worse by more than max_label_ap_drop {max_label_ap_drop} "
                       f"with {level}")
    figures = f"ΔmAP {_fmt(paired['map'])}" + (f", Δmicro F1 {_fmt(paired['micro_f1'])}" if paired["micro_f1"] else "")
    if paired["map"] is None or paired["map"][1] <= margin:
        return False, f"{figures}: not better" + (f" by more than margin {margin}" if margin else "") + f" with {level}"
    return True, f"{figures}: better" + (f" by more than margin {margin}" if margin else "") + f" with {level}"


def scores_from_vectors(meta: dict, backbone_id, image_size) -> bool:
    """Whether a model (its model.json) scores vectors of this backbone and size with its head alone:
    a head-mode model on that very backbone and size."""
    return meta.get("mode", "head") == "head" and meta.get("backbone_id") == backbone_id \
        and int(meta.get("image_size", 0)) == int(image_size)


def _champion_head_scores(client, model_name: str, version, meta: dict, labels: list[str], cached: np.ndarray,
                          scratch: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The champion's scores from its own head on the cached test vectors, and the labels it chooses at its
    own thresholds, when it is a head-mode model on the same backbone and size (the vectors are exactly what
    its backbone gives); else None. Only its ``model.json``, ``head.npz`` and thresholds are downloaded."""
    import mlflow

    from mltag.data.handoff import read_handoff
    from mltag.head.saved import load_head

    try:
        source = client.get_model_version_download_uri(model_name, str(version))
        folder = scratch / "champion"
        folder.mkdir()
        for name in ("model.json", "head.npz", "thresholds.json"):
            mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/artifacts/model/{name}",
                                                dst_path=str(folder))
    except Exception as e:  # noqa: BLE001 - an older champion's layout, or a store that cannot: score its images
        log.debug("register: champion head not downloadable (%s); scoring its images", e)
        return None
    champ = read_handoff(folder / "model.json", "the champion's model.json", "train")
    if not scores_from_vectors(champ, meta.get("backbone_id"), meta["image_size"]) or champ.get("labels") != labels:
        return None
    head = load_head(folder, labels)
    if head is None:
        return None
    scores = head.predict(cached)
    t, min_labels, groups = M.decision_rule(read_thresholds(folder / "thresholds.json", labels), labels)
    return scores, M.decide(scores, t, min_labels, groups)


def _score_pyfunc(model, images: list[Path], labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A registered pyfunc's scores of ``images`` and the labels it chose (at its own thresholds), as 0/1."""
    import pandas as pd

    cols = [f"score_{lb}" for lb in labels]
    out, chosen = [], []
    for at in range(0, len(images), MEMO_CHUNK):  # base64 of every test image at once grows with the data
        df = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in images[at: at + MEMO_CHUNK]]})
        res = model.predict(df)
        missing = [c for c in cols if c not in res.columns]
        if missing:
            raise MltagError(f"champion does not score the same labels (missing {', '.join(missing)})")
        out.append(res[cols].to_numpy(np.float64))
        chosen += [set(str(v).split(",")) if v else set() for v in res["labels"]]
    pred = np.array([[lb in c for lb in labels] for c in chosen], dtype=int).reshape(len(chosen), len(labels))
    return (np.concatenate(out) if out else np.zeros((0, len(labels)))), pred


def decide(client, register: config.Register, champ, existing, chall: tuple, y_test: np.ndarray,
            meta: dict, labels: list[str], cached, test_images: list[Path], tmp: Path, result: dict) -> tuple[bool, str]:
    """The gate: whether the challenger replaces the champion, and why, in one sentence. ``chall`` is the
    challenger's scores and 0/1 decisions on the test images. The champion is scored on the same images:
    from the cached vectors when it shares the challenger's backbone, else end to end through its
    registered pyfunc. Records the champion's figures and the comparison in ``result``."""
    import mlflow

    model_name = register.model_name
    if champ is None:
        return True, "no champion yet"
    theirs = (champ.tags or {}).get("mltag.labels")
    if theirs is not None and theirs != ",".join(labels):
        raise MltagError(f"the champion of registered model {model_name!r} (version {champ.version}) scores other "
                         f"labels ({theirs.replace(',', ', ')}), not {', '.join(labels)}: a different label set is a "
                         "different model. Set register.model_name in params.yaml to a new name (or leave it empty to "
                         "name the model after the dataset's folder) and rerun: only register runs again")
    if existing is not None and str(champ.version) == str(existing.version):
        return True, "already the champion (same model content)"
    champion = _champion_head_scores(client, model_name, champ.version, meta, labels, cached,
                                     tmp) if cached is not None else None
    result["champion_scored_from"] = "cached vectors" if champion is not None else "images"
    if champion is None:
        try:
            champ_model = mlflow.pyfunc.load_model(f"models:/{model_name}/{champ.version}")
        except Exception as e:  # noqa: BLE001 - MLflow raises many kinds for files that are gone
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise MltagError(f"the champion of {model_name!r} (version {champ.version}, run {champ.run_id}) cannot be "
                             f"loaded to compare with: its artifacts are missing or unreadable ({first}); promote "
                             f"another version (mltag promote {model_name} VERSION) or delete the alias "
                             "'champion', then rerun register") from None
        champion = _score_pyfunc(champ_model, test_images, labels)
    champ_ap = M.average_precisions(y_test, champion[0])
    result["champion_version"] = int(champ.version)
    result["champion_test_map"] = float(np.nanmean(champ_ap))
    if register.gate == "point":
        return gate(M.average_precisions(y_test, chall[0]), champ_ap, labels, register.margin,
                    register.max_label_ap_drop)
    paired = M.paired_bootstrap(y_test, chall[0], champion[0], chall[1], champion[1], n=register.bootstrap,
                                level=register.confidence)
    result["comparison"] = {"rule": "paired", "confidence": register.confidence, "n_resamples": register.bootstrap,
                            "d_map": paired["map"], "d_micro_f1": paired["micro_f1"],
                            "d_ap": dict(zip(labels, paired["per_label"]))}
    return paired_gate(paired, labels, register.confidence, register.margin, register.max_label_ap_drop)
