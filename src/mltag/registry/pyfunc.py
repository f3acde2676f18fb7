"""The MLflow pyfunc wrapper: a DataFrame of base64 images in, labels and scores out."""

import base64
import binascii

import mlflow.pyfunc
import pandas as pd


def bad_request(message: str) -> Exception:
    """An error the scoring server answers with HTTP 400 and this message alone: an ``MlflowException``
    (anything else, it answers with the server's stack trace)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def decode_images(column) -> list[bytes]:
    out = []
    for i, v in enumerate(column):
        if isinstance(v, (bytes, bytearray)):
            out.append(bytes(v))
            continue
        try:
            out.append(base64.b64decode(str(v), validate=True))
        except (binascii.Error, ValueError):
            raise bad_request(f"row {i}: column 'image' must hold base64-encoded image bytes") from None
    return out


def check_params(params: dict | None) -> str:
    """The request's ``tta`` (``none`` when absent); any other key or value is a 400 naming what is allowed, never
    the server's stack trace (which holds the model's artifact paths)."""
    from mltag.config import choices

    params = dict(params or {})
    tta = params.pop("tta", "none")
    allowed = choices("evaluate", "tta")
    if params:
        raise bad_request(f"unknown parameter {sorted(params)[0]!r}: this model takes only 'tta' ({', '.join(allowed)})")
    if not isinstance(tta, str) or tta not in allowed:
        raise bad_request(f"parameter 'tta' must be one of {', '.join(allowed)}, got {tta!r}")
    return tta


def first_bad_row(images: list[bytes], size: int) -> tuple[int, str] | None:
    """The first row whose image cannot be decoded, and why (only when a batch failed: decoding is the cost)."""
    from mltag.data.images import BadImage, load_image

    for i, data in enumerate(images):
        try:
            load_image(data, size)
        except BadImage as e:
            return i, str(e)
    return None


class MltagPyfunc(mlflow.pyfunc.PythonModel):
    """Wraps :class:`mltag.inference.model.InferenceModel`; thresholds travel in the artifacts.

    ``params={"tta": "mean"}`` (or ``"max"``) turns on test-time augmentation.
    """

    def load_context(self, context):
        from mltag.inference.model import InferenceModel

        self.model = InferenceModel(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from mltag.data.images import BadImage

        if "image" not in model_input.columns:
            raise bad_request("input needs a column 'image' with base64-encoded image bytes")
        tta = check_params(params)
        images = decode_images(model_input["image"])
        try:
            results = self.model.predict(images, tta=tta)
        except BadImage as e:  # name the row: a batch of 64 images says which one
            bad = first_bad_row(images, self.model.image_size)
            raise bad_request(f"row {bad[0]}: unreadable image: {bad[1]}" if bad else f"unreadable image: {e}") from None
        rows = []
        for r in results:
            row = {"labels": ",".join(r["labels"])}
            row.update({f"score_{k}": v for k, v in r["scores"].items()})
            rows.append(row)
        return pd.DataFrame(rows, columns=["labels", *(f"score_{lb}" for lb in self.model.labels)])
