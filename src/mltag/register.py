"""register: log the model to MLflow, register a version, alias it ``challenger``, gate ``champion``.

The gate re-scores the current champion on the current test split (never trusting old
tags) and promotes the challenger only when its test mAP beats the champion's by more
than ``margin`` and no label's AP drops by more than ``max_label_ap_drop``.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from mltag import metrics as M
from mltag.common import MltagError, write_json_atomic
from mltag.prepare import image_root_of, load_prepared

RUNTIME_PACKAGES = ("tensorflow", "tensorflow-hub", "pillow", "numpy", "pandas", "scikit-learn", "mlflow")


def pip_requirements() -> list[str]:
    reqs = []
    for name in RUNTIME_PACKAGES:
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def _bundle(model_dir: Path, thresholds_file: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in ("inference", "model.json", "labels.txt"):
        src = model_dir / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest / name)
    shutil.copy2(thresholds_file, dest / "thresholds.json")
    return dest


def _score_pyfunc(model, images: list[Path], labels: list[str]) -> np.ndarray:
    import pandas as pd

    df = pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode() for p in images]})
    res = model.predict(df)
    cols = [f"score_{lb}" for lb in labels]
    missing = [c for c in cols if c not in res.columns]
    if missing:
        raise MltagError(f"champion does not score the same labels (missing {', '.join(missing)})")
    return res[cols].to_numpy(np.float64)


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


def register(model_dir: str | os.PathLike, thresholds: str | os.PathLike, prepared: str | os.PathLike,
             out: str | os.PathLike, model_name: str = "mltag", margin: float = 0.0,
             max_label_ap_drop: float = 0.05, images: str | os.PathLike | None = None,
             tracking_uri: str | None = None, experiment: str = "mltag", run_id: str | None = None) -> dict:
    """Log, register and (maybe) promote the model; write the decision to ``out``."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from mltag import tracking
    from mltag.pyfunc import MltagPyfunc

    model_dir, thresholds = Path(model_dir), Path(thresholds)
    if not thresholds.is_file():
        raise MltagError("thresholds file not found; run calibrate first", thresholds)
    labels, test = load_prepared(prepared, "test")
    root = Path(images) if images else image_root_of(prepared)
    test_images = [root / ex.path for ex in test]
    y_test = np.array([ex.flags for ex in test], dtype=int).reshape(len(test), len(labels))
    uri = tracking.setup(tracking_uri)
    client = MlflowClient()
    run_id = run_id or tracking.run_id_of(model_dir)
    if run_id is None:
        mlflow.set_experiment(experiment)
    tmp = Path(tempfile.mkdtemp(prefix="mltag-register-"))
    try:
        bundle = _bundle(model_dir, thresholds, tmp / "model")
        from mltag.model import InferenceModel

        local = InferenceModel(bundle)
        example = pd.DataFrame({"image": [base64.b64encode(test_images[0].read_bytes()).decode()]}) if test_images \
            else None
        py = MltagPyfunc()
        py.model = local
        signature = infer_signature(example, py.predict(None, example), params={"tta": "none"}) \
            if example is not None else None
        chall_scores = local.scores(test_images) if test_images else np.zeros((0, len(labels)))
        chall_ap = M.average_precisions(y_test, chall_scores)
        with mlflow.start_run(run_id=run_id) as run:
            info = mlflow.pyfunc.log_model(
                name="model", python_model=MltagPyfunc(), artifacts={"model": str(bundle)},
                code_paths=[str(Path(__file__).parent)], signature=signature, input_example=example,
                pip_requirements=pip_requirements(), registered_model_name=model_name)
            mv = info.registered_model_version
            client.set_registered_model_alias(model_name, "challenger", mv)
            chall_map = float(np.nanmean(chall_ap))
            client.set_model_version_tag(model_name, mv, "mltag.test_map", f"{chall_map:.6f}")
            client.set_model_version_tag(model_name, mv, "mltag.labels", ",".join(labels))
            try:
                champ = client.get_model_version_by_alias(model_name, "champion")
            except mlflow.exceptions.MlflowException:
                champ = None
            result = {"model_name": model_name, "version": int(mv), "run_id": run.info.run_id,
                      "challenger_test_map": chall_map, "tracking_uri": uri, "champion_version": None,
                      "champion_test_map": None}
            if champ is None:
                promote, reason = True, "no champion yet"
            else:
                champ_model = mlflow.pyfunc.load_model(f"models:/{model_name}/{champ.version}")
                champ_ap = M.average_precisions(y_test, _score_pyfunc(champ_model, test_images, labels))
                result["champion_version"] = int(champ.version)
                result["champion_test_map"] = float(np.nanmean(champ_ap))
                promote, reason = gate(chall_ap, champ_ap, labels, margin, max_label_ap_drop)
            if promote:
                client.set_registered_model_alias(model_name, "champion", mv)
            client.set_model_version_tag(model_name, mv, "mltag.gate", ("promoted: " if promote else "kept: ") + reason)
            mlflow.log_metrics({"registered_test_map": chall_map})
            mlflow.set_tag("mltag.registered_version", str(mv))
            result.update({"promoted": promote, "reason": reason,
                           "aliases": ["challenger", "champion"] if promote else ["challenger"]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json_atomic(out, result)
    verdict = "promoted to champion" if promote else "kept as challenger"
    print(f"register: {model_name} version {result['version']} {verdict}: {reason}")
    return result


def promote(model_name: str, version: int | str, reason: str, user: str | None = None,
            tracking_uri: str | None = None) -> None:
    """Move ``champion`` to ``version`` by hand, recording who and why in tags."""
    from mlflow import MlflowClient

    from mltag import tracking

    tracking.setup(tracking_uri)
    client = MlflowClient()
    try:
        client.get_model_version(model_name, str(version))
    except Exception:  # noqa: BLE001
        raise MltagError(f"model {model_name!r} has no version {version}") from None
    user = user or os.environ.get("USER") or getpass.getuser()
    client.set_registered_model_alias(model_name, "champion", str(version))
    client.set_model_version_tag(model_name, str(version), "mltag.promoted_by", user)
    client.set_model_version_tag(model_name, str(version), "mltag.promoted_reason", reason)
    client.set_model_version_tag(model_name, str(version), "mltag.gate", f"manual promotion by {user}: {reason}")
    print(json.dumps({"model_name": model_name, "champion": int(version), "by": user, "reason": reason}))
