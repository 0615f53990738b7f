"""onnxruntime (any execution provider): the optimized model.onnx is the deployable artifact."""

from __future__ import annotations

from dsopt.backend import Target

#: `com.microsoft` contrib ops with CPU kernels in onnxruntime >= 1.20 (and CUDA ones): float
#: fusions, low-bit weights (MatMulNBits, GatherBlockQuantized) and int8 elementwise kernels.
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
        "MatMulNBits",
        "GatherBlockQuantized",
        "QLinearAdd",
        "QLinearMul",
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
