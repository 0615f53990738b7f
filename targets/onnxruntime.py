"""onnxruntime (any execution provider): the optimized model.onnx is the deployable artifact."""

from __future__ import annotations

from dsopt.backend import Target

#: `com.microsoft` contrib ops with CPU kernels in every onnxruntime >= 1.17 (and CUDA ones).
CONTRIB_OPS = frozenset(
    f"com.microsoft::{op}"
    for op in (
        "FusedConv",
        "FusedMatMul",
        "BiasGelu",
        "FastGelu",
        "SkipLayerNormalization",
        "MultiHeadAttention",
        "Attention",
        "QuickGelu",
    )
)

ONNXRUNTIME = Target(
    name="onnxruntime",
    aliases=("ort",),
    summary="onnxruntime on any execution provider: writes the optimized model.onnx",
    pipeline="default",
    precisions={"float32": 1.0},
    fused_ops=CONTRIB_OPS,
    opset=21,
)
