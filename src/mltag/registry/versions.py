"""The registry's writes and reads for register and promote: one version per model content, aliases moved
only after the decision is recorded, and a registry that fails to answer never read as "nothing there"
(only MLflow's ``RESOURCE_DOES_NOT_EXIST`` means absent).
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import io
import json
import logging
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mltag.errors import MltagError
from mltag.files import fault_point

log = logging.getLogger(__name__)


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # mltag/: a registered version carries it as code


# What a served model imports: a head on its backbone with model.tflite runs on LiteRT and numpy alone (tested: no
# TensorFlow module is loaded); a fine-tuned model, or one without model.tflite, runs its SavedModel on TensorFlow.
LITERT_PACKAGES = ("ai-edge-litert", "pillow", "numpy", "pandas", "mlflow", "pydantic", "pyyaml", "tqdm")
TF_PACKAGES = ("tensorflow", "tensorflow-hub", "scikit-learn")


def needs_tensorflow(bundle: Path) -> bool:
    """Whether the model in ``bundle`` is served by TensorFlow (not a head-mode model with its model.tflite)."""
    from mltag.data.formats import read_model_meta

    meta = read_model_meta(bundle, verify=False)
    return meta.get("mode", "head") != "head" or not (Path(bundle) / "model.tflite").is_file()


def pip_requirements(tensorflow: bool = True) -> list[str]:
    """The served model's environment, pinned to this one's versions: ``LITERT_PACKAGES``, and ``TF_PACKAGES``
    when ``tensorflow``."""
    reqs = []
    for name in LITERT_PACKAGES + (TF_PACKAGES if tensorflow else ()):
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


@contextlib.contextmanager
def _packages_known(reqs: list[str]):
    """MLflow checks a model's pip requirements against the installed packages, and to do so first maps every
    installed distribution to its modules by reading each one's file list: 2 s of CPU in this environment, more
    than register's own work. ``reqs`` are the installed versions (``pip_requirements``), so for the call it gets
    the map of just these names (its private table: were it renamed, MLflow would read every distribution again)."""
    from mlflow.utils import requirements_utils as ru

    before = getattr(ru, "_MODULES_TO_PACKAGES", False)
    if before is None:  # not built yet in this process
        names = [r.split("==")[0] for r in reqs]
        ru._MODULES_TO_PACKAGES = {n.replace("-", "_"): [n] for n in names}
    try:
        yield
    finally:
        if before is None:
            ru._MODULES_TO_PACKAGES = None


def model_hash(model_dir: Path, thresholds: Path) -> str:
    """SHA-256 over the model folder's files (names and bytes) and the thresholds: the version's identity."""
    import hashlib

    from mltag.files import sha256_file

    h = hashlib.sha256()
    for f in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        if f.name in ("run.json", "config.json", "summary.json"):
            continue  # run bookkeeping, not the model
        h.update(f"{f.relative_to(model_dir).as_posix()}:{sha256_file(f)}\n".encode())
    h.update(f"thresholds:{sha256_file(thresholds)}".encode())
    return h.hexdigest()


def registry_error(e: Exception, what: str) -> MltagError:
    """A registry read that failed for any reason but "does not exist": one line naming the store, never absent."""
    import mlflow

    from mltag.tracking import runs as tracking

    uri = mlflow.get_registry_uri()  # the store the failed call went to (set by the step, or --tracking-uri)
    first = tracking.scrub(str(e).splitlines()[0][:300] if str(e) else type(e).__name__, uri)
    return MltagError(f"the MLflow registry at {tracking.mask_uri(uri)} failed to answer {what} ({first}); nothing was "
                      "registered and no alias moved. Rerun register once the server answers")


def absent(e: Exception) -> bool:
    """Whether an MLflow error means "there is no such thing" (and only that)."""
    return getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def version_with_hash(client, model_name: str, content: str):
    """The oldest version of ``model_name`` with this content hash, or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{model_name}'")
    except MlflowException as e:
        if absent(e):
            return None
        raise registry_error(e, f"the search for versions of {model_name!r}") from None
    found = [v for v in versions if (v.tags or {}).get("mltag.content_hash") == content]
    return min(found, key=lambda v: int(v.version)) if found else None


def alias(client, model_name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as e:
        # MLflow answers an alias nobody set with INVALID_PARAMETER_VALUE, "Registered model alias X not found."
        if absent(e) or getattr(e, "error_code", None) == "INVALID_PARAMETER_VALUE" and \
                f"alias {alias} not found" in str(e):
            return None
        raise registry_error(e, f"which version of {model_name!r} is {alias!r}") from None


def create_version(client, model_name: str, existing, tags: dict, bundle: Path, signature, example) -> str:
    """The registered version of this model content: a new one (logged in the active run, its tags set in
    the same call), or the one a crashed or repeated register made already."""
    import mlflow

    if existing is not None:  # one version per model content
        mv = str(existing.version)
        for k, v in tags.items():
            client.set_model_version_tag(model_name, mv, k, v)
        log.info("register: this model content is already version %s; reusing it", mv)
        fault_point("register:created")
        return mv
    reqs = pip_requirements(needs_tensorflow(bundle))
    with _packages_known(reqs):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PACKAGE_DIR / "registry" / "pyfunc_model.py"),
            artifacts={"model": str(bundle)}, code_paths=[str(PACKAGE_DIR)], signature=signature,
            input_example=example, pip_requirements=reqs)
    fault_point("register:logged")
    with contextlib.redirect_stderr(io.StringIO()):  # MLflow's "Successfully registered..." lines
        mv = str(mlflow.register_model(info.model_uri, model_name, tags=tags).version)
    fault_point("register:created")
    return keep_oldest(client, model_name, mv, tags["mltag.content_hash"])


def keep_oldest(client, model_name: str, mv: str, content: str) -> str:
    """One version per model content, whatever raced: two registers of one folder at once, or a create that
    MLflow's client retried after it had succeeded. The oldest version with this content is kept; ``mv``,
    when newer, is deleted. Every racer keeps the same one and deletes only its own."""
    oldest = version_with_hash(client, model_name, content)
    if oldest is None or str(oldest.version) == mv:
        return mv
    try:
        client.delete_model_version(model_name, mv)
    except Exception as e:  # noqa: BLE001 - said, and marked, below: the oldest is the one used either way
        log.warning("register: version %s duplicates version %s (same content) and could not be deleted (%s)",
                    mv, oldest.version, type(e).__name__)
        client.set_model_version_tag(model_name, mv, "mltag.duplicate_of", str(oldest.version))
    log.info("register: this model content is already version %s (made meanwhile); keeping it", oldest.version)
    return str(oldest.version)


def move_aliases(client, model_name: str, mv: str, champ, promote: bool, reason: str) -> tuple[bool, str]:
    """``challenger`` to ``mv``, then ``champion`` when promoted, only after the decision is recorded on the
    version. A champion that another register moved meanwhile is left where it is."""
    try:
        client.set_registered_model_alias(model_name, "challenger", mv)
        fault_point("register:challenger")
        if promote:
            now = alias(client, model_name, "champion")
            now_v, scored_v = (str(now.version) if now else None), (str(champ.version) if champ else None)
            if now_v != scored_v and now_v != mv:
                reason = (f"the champion moved to version {now_v} while this register was comparing with "
                          f"version {scored_v}; rerun register to compare with it")
                client.set_model_version_tag(model_name, mv, "mltag.gate", f"kept: {reason}")
                return False, reason  # compare again next time
            client.set_registered_model_alias(model_name, "champion", mv)
            fault_point("register:champion")
    except Exception as e:
        client.set_model_version_tag(model_name, mv, "mltag.register_error", f"{type(e).__name__}: {e}"[:500])
        raise
    return promote, reason


def promote(model_name: str, version: int | str, reason: str, user: str | None = None,
            tracking_uri: str | None = None) -> dict:
    """Move ``champion`` to ``version`` by hand, recording who and why in tags."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from mltag.tracking import runs as tracking

    tracking.setup_checked(tracking_uri)
    client = MlflowClient()
    try:
        client.get_model_version(model_name, str(version))
    except MlflowException as e:
        if absent(e):
            raise MltagError(f"model {model_name!r} has no version {version}") from None
        raise registry_error(e, f"whether {model_name!r} has version {version}") from None
    user = user or os.environ.get("USER") or getpass.getuser()

    try:  # who and why first, the alias last: a failure leaves champion where it was
        client.set_model_version_tag(model_name, str(version), "mltag.promoted_by", user)
        client.set_model_version_tag(model_name, str(version), "mltag.promoted_reason", reason)
        client.set_model_version_tag(model_name, str(version), "mltag.gate", f"manual promotion by {user}: {reason}")
        client.set_registered_model_alias(model_name, "champion", str(version))
    except MlflowException as e:
        raise registry_error(e, f"the promotion of {model_name!r} version {version}") from None
    result = {"model_name": model_name, "champion": int(version), "by": user, "reason": reason}
    log.info("promote: %s", json.dumps(result))
    return result


def signature(bundle: Path, test_images: list[Path]):
    """The version's signature and input example: one test image as base64, and what the model returns."""
    import pandas as pd
    from mlflow.models import infer_signature

    from mltag.inference.model import InferenceModel
    from mltag.registry.pyfunc import MltagPyfunc

    if not test_images:
        return None, None
    example = pd.DataFrame({"image": [base64.b64encode(test_images[0].read_bytes()).decode()]})
    py = MltagPyfunc()
    py.model = InferenceModel(bundle)
    return infer_signature(example, py.predict(None, example), params={"tta": "none"}), example
