"""onnxruntime (any execution provider): the optimized model.onnx is the deployable artifact."""

from __future__ import annotations

from dsopt.backend import Target

ONNXRUNTIME = Target(
    name="onnxruntime",
    aliases=("ort",),
    summary="onnxruntime on any execution provider: writes the optimized model.onnx",
    pipeline="default",
    precisions={"float32": 1.0},
)
