"""The model folder's model files, written without TensorFlow in head mode.

A model folder serves two ways from one backbone and one head:

* ``model.tflite``: the end-to-end model for LiteRT (uint8 pixels ``[B,S,S,3]`` in, float
  scores out), made by appending the head's Dense layers and a sigmoid to the backbone's
  LiteRT file (``compose_tflite``). The backbone's file is the one the bottleneck step
  converted once per backbone, so train neither imports TensorFlow nor converts anything.
* ``backbone/`` (the feature-vector SavedModel) and ``head.npz`` (the head's weights): what
  the TF engine (a GPU) runs, the head in numpy.

A fine-tuned backbone is written as a SavedModel (``backbone/``) and converted once for that
model; the rest is the same.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np

from mltag.errors import MltagError

log = logging.getLogger("mltag.steps.train")

BACKBONE_DIR = "backbone"


def write_model_folder(folder: Path, head_weights: list[np.ndarray], backbone, tuned_net, meta: dict,
                       backbone_cache: str | os.PathLike | None) -> None:
    """Write ``head.npz``, ``backbone/``, ``model.tflite`` and ``model.json`` into ``folder``.

    ``backbone`` is the resolved backbone the bottlenecks were computed with; ``tuned_net`` a
    fine-tuned ``LiteNet``, or None for that backbone as it is. Without a LiteRT backbone (a
    module LiteRT cannot convert) there is no ``model.tflite`` and inference uses TF.
    """
    from mltag.data.formats import write_head, write_model_meta

    write_head(folder, head_weights, meta.get("labels"))
    size = int(meta["image_size"])
    try:
        if tuned_net is None:
            shutil.copytree(backbone.location, folder / BACKBONE_DIR)
            from mltag.inference.engine import litert_backbone

            lite = litert_backbone(backbone, size, backbone_cache)  # converted by the bottleneck step
            compose_tflite(lite, head_weights, folder / "model.tflite")
        else:  # the tuned backbone, written as a SavedModel the same way as the built-in one
            from mltag.backbones.builtin import build_builtin
            from mltag.inference.engine import convert_backbone

            build_builtin(getattr(tuned_net, "export_name", tuned_net.name), folder / BACKBONE_DIR, tuned_net.state_dict())
            scratch = folder / ".backbone.tflite"
            convert_backbone(str(folder / BACKBONE_DIR), size, scratch)
            compose_tflite(scratch, head_weights, folder / "model.tflite")
            scratch.unlink()
    except MltagError as e:
        log.warning("train: no model.tflite (%s); inference will use TF", e)
    write_model_meta(folder, meta)


def compose_tflite(backbone_tflite: str | os.PathLike, head_weights: list[np.ndarray],
                   out: str | os.PathLike) -> Path:
    """The end-to-end LiteRT model: the backbone's ``.tflite`` (uint8 pixels in, features out) with the
    head appended: one FULLY_CONNECTED per Dense layer (ReLU fused on hidden ones), then LOGISTIC.

    The head's weights go in as float32 constants, so the file scores exactly what ``head.npz``
    scores on the backbone's features (to float rounding, which a test checks). The graph is
    edited through the TFLite flatbuffer schema (``ai_edge_litert.schema_py_generated``): no
    TensorFlow, no converter, a fraction of a second.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as fb

    from mltag.files import atomic_path

    src, model = _backbone_graph(backbone_tflite, head_weights)
    graph = model.subgraphs[0]

    def opcode(code: int) -> int:
        for i, oc in enumerate(model.operatorCodes):
            if max(oc.builtinCode, oc.deprecatedBuiltinCode) == code:
                return i
        oc = fb.OperatorCodeT()
        oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 1
        model.operatorCodes.append(oc)
        return len(model.operatorCodes) - 1

    def tensor(name: str, shape: list[int], data: np.ndarray | None = None) -> int:
        buf = fb.BufferT()
        if data is not None:
            buf.data = np.frombuffer(np.ascontiguousarray(data, np.float32).tobytes(), np.uint8)
        model.buffers.append(buf)
        t = fb.TensorT()
        t.name, t.type, t.buffer, t.shape = name, fb.TensorType.FLOAT32, len(model.buffers) - 1, list(shape)
        if data is None:  # an activation: any batch size
            t.shape, t.shapeSignature = [1, *shape], [-1, *shape]
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    def op(code: int, inputs: list[int], outputs: list[int], options=None) -> None:
        o = fb.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = opcode(code), inputs, outputs
        if options is not None:
            o.builtinOptionsType, o.builtinOptions = fb.BuiltinOptions.FullyConnectedOptions, options
        graph.operators.append(o)

    x = graph.outputs[0]
    n_layers = len(head_weights) // 2
    for i in range(n_layers):
        kernel, bias = np.asarray(head_weights[2 * i], np.float32), np.asarray(head_weights[2 * i + 1], np.float32)
        last = i == n_layers - 1
        w = tensor(f"head/dense_{i}/kernel", [kernel.shape[1], kernel.shape[0]], kernel.T)  # [units, inputs]
        b = tensor(f"head/dense_{i}/bias", [kernel.shape[1]], bias)
        y = tensor("head/logits" if last else f"head/hidden_{i}", [kernel.shape[1]])
        fc = fb.FullyConnectedOptionsT()
        fc.fusedActivationFunction = fb.ActivationFunctionType.NONE if last else fb.ActivationFunctionType.RELU
        op(fb.BuiltinOperator.FULLY_CONNECTED, [x, w, b], [y], fc)
        x = y
    scores = tensor("scores", [int(head_weights[-1].shape[0])])
    op(fb.BuiltinOperator.LOGISTIC, [x], [scores])
    graph.outputs = [scores]
    for sig in model.signatureDefs or []:
        out_map = fb.TensorMapT()
        out_map.name, out_map.tensorIndex = "scores", scores
        sig.outputs = [out_map]
    builder = _aligned_builder(flatbuffers)(len(src) + sum(w.nbytes for w in head_weights) + (1 << 16))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_bytes(builder.Output())
    return out


def _backbone_graph(backbone_tflite: str | os.PathLike, head_weights: list[np.ndarray]):
    """The backbone's ``.tflite`` bytes and its unpacked model, checked: one graph whose one output (the
    features) is as wide as the head's input."""
    from ai_edge_litert import schema_py_generated as fb

    src = Path(backbone_tflite).read_bytes()
    try:
        model = fb.ModelT.InitFromPackedBuf(src, 0)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise MltagError(f"not a LiteRT model file ({type(e).__name__})", backbone_tflite) from None
    if len(model.subgraphs) != 1 or len(model.subgraphs[0].outputs) != 1:
        raise MltagError("the backbone's LiteRT file must have one graph with one output (the features)",
                         backbone_tflite)
    graph = model.subgraphs[0]
    dim = int(graph.tensors[graph.outputs[0]].shape[-1])
    if head_weights[0].shape[0] != dim:
        raise MltagError(f"the head takes {head_weights[0].shape[0]} features but the backbone gives {dim}",
                         backbone_tflite)
    return src, model


def _aligned_builder(flatbuffers):
    """A flatbuffers ``Builder`` that starts every array on 16 bytes, as the converter lays out
    buffers (kernels may read weights in place)."""

    class AlignedBuilder(flatbuffers.Builder):
        def CreateNumpyVector(self, x: np.ndarray) -> int:  # noqa: N802 - the library's name
            payload = np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"), copy=False).tobytes()
            self.StartVector(x.itemsize, x.size, max(16, x.dtype.alignment))
            self.head -= len(payload)
            self.Bytes[self.head: self.head + len(payload)] = payload
            self.vectorNumElems = x.size
            return self.EndVector()

    return AlignedBuilder
