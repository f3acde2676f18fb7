"""The MLflow pyfunc wrapper: a DataFrame of base64 images in, labels and scores out."""

import base64
import binascii

import mlflow.pyfunc
import pandas as pd


def decode_images(column) -> list[bytes]:
    out = []
    for i, v in enumerate(column):
        if isinstance(v, (bytes, bytearray)):
            out.append(bytes(v))
            continue
        try:
            out.append(base64.b64decode(str(v), validate=True))
        except (binascii.Error, ValueError):
            raise ValueError(f"row {i}: column 'image' must hold base64-encoded image bytes") from None
    return out


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
            raise ValueError("input needs a column 'image' with base64-encoded image bytes")
        images = decode_images(model_input["image"])
        try:
            results = self.model.predict(images, tta=str((params or {}).get("tta", "none")))
        except BadImage as e:
            raise ValueError(f"unreadable image: {e}") from None
        rows = []
        for r in results:
            row = {"labels": ",".join(r["labels"])}
            row.update({f"score_{k}": v for k, v in r["scores"].items()})
            rows.append(row)
        return pd.DataFrame(rows, columns=["labels", *(f"score_{lb}" for lb in self.model.labels)])
