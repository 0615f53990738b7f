"""What each runtime does with the QuantizeLinear/DequantizeLinear around an op, as data.

`quantize-static` places Q/DQ with the quantizer tables below (`COMPUTE_OPS`, `INT8_OPS`,
`SHARED_SCALE_OPS`); `dsopt lint` predicts fusions with a runtime's `QdqKernels`. Both live
here so that a new measurement changes one file.

The onnxruntime table was measured on onnxruntime 1.32, CPU provider, graph optimizations
`ORT_ENABLE_ALL`, by reading the optimized model (tests/core/test_quant_lint.py repeats the
measurements). The TVM table is what `legalize-quantized` and TVM's Relax ONNX importer do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = [
    "COMPUTE_OPS",
    "INT8_OPS",
    "ONNXRUNTIME_CPU",
    "SHARED_SCALE_OPS",
    "TVM_RELAX",
    "QdqKernels",
    "kernels_for",
]

#: Weight-bearing ops that run as int8 kernels (QLinearConv, QLinearMatMul, QGemm): input
#: index of the weight -> its per-channel (output-channel) axis, given the node.
COMPUTE_OPS: dict[str, int] = {"Conv": 1, "MatMul": 1, "Gemm": 1}

#: Ops onnxruntime's CPU provider runs on int8 when Q/DQ surround them (QLinearAdd, ...);
#: measured on onnxruntime 1.32. HardSigmoid, HardSwish, Tanh, Sub, Div, Pad, ReduceMean
#: and linear Resize stay float there, so they are not quantized.
INT8_OPS = frozenset(
    {"Add", "Mul", "Sigmoid", "LeakyRelu", "AveragePool", "GlobalAveragePool", "Concat", "Softmax"}
)

#: Data movement onnxruntime runs on the integer tensor when input and output share one
#: scale (it drops the Q/DQ): their outputs inherit their input's parameters. Resize only with
#: `mode="nearest"`: onnxruntime 1.32 runs linear Resize (and SpaceToDepth) in float.
SHARED_SCALE_OPS = frozenset(
    {
        "MaxPool", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split",
        "Resize", "DepthToSpace", "Identity",
    }
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class QdqKernels:
    """What one runtime fuses of `DequantizeLinear -> op -> QuantizeLinear`, declared as data.

    Args:
        runtime: The runtime and version the table describes, for messages.
        compute: Weight ops fused into integer kernels: op -> input index of the weight. They
            need every operand behind a DequantizeLinear, per-tensor activation parameters, a
            constant weight DQ and one QuantizeLinear reading the result (after an absorbed
            Relu/Clip).
        float_output: Compute ops fused even when their result is not quantized (onnxruntime's
            MatMulIntegerToFloat, QGemm with a float output), given a constant weight.
        int8: Ops with an integer kernel when every data input is dequantized and the result is
            quantized, all per tensor.
        shared_scale: Ops the runtime runs on the integer tensor, dropping the DQ before and the
            Q after, when both carry the same parameters.
        nearest_only: Ops of `shared_scale` that qualify only with `mode="nearest"`.
        absorbed: Activations dropped before a QuantizeLinear that clamps the same: Relu when
            the Q's zero point is its type's minimum, Clip when its range covers the Q's.
        removed: Ops the runtime deletes (they cost nothing between Q and DQ).
        float_reasons: Why an op known to stay float does, and what to do, keyed by op.
        float_advice: What to do about an op that runs in float between Q and DQ (`{op}`: its
            type).
        qoperator: QOperator-format ops (`domain::Op`) the runtime runs in float after all
            (dequantize, float op, quantize) -> why; every other QLinear* op is integer.
    """

    runtime: str
    compute: Mapping[str, int] = dataclasses.field(default_factory=dict)
    float_output: frozenset[str] = frozenset()
    int8: frozenset[str] = frozenset()
    shared_scale: frozenset[str] = frozenset()
    nearest_only: frozenset[str] = frozenset()
    absorbed: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()
    float_reasons: Mapping[str, str] = dataclasses.field(default_factory=dict)
    float_advice: str = ""
    qoperator: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def fuses_anything(self) -> bool:
        """Whether any QDQ island becomes an integer kernel on this runtime."""
        return bool(self.compute or self.int8 or self.shared_scale)


_NO_INT8_KERNEL = "onnxruntime CPU has no int8 kernel for it"

#: onnxruntime 1.32, CPU provider, ORT_ENABLE_ALL (QDQ selectors, Relu/ClipQuantFusion,
#: DoubleQDQPairsRemover, QDQS8ToU8 on x86). Measured, not read from the sources. Known
#: differences from a plain reading: a per-axis activation DQ feeding a Conv is still fused
#: into QLinearConv, which then fails at run time (reported as `per-axis-activation`);
#: SpaceToDepth and linear Resize keep their Q/DQ; a float constant Conv bias is quantized by
#: onnxruntime itself (no finding), an int32 bias DQ whose scale is not x_scale * w_scale is not.
ONNXRUNTIME_CPU = QdqKernels(
    runtime="onnxruntime 1.32 CPU",
    compute=dict(COMPUTE_OPS),
    float_output=frozenset({"MatMul", "Gemm"}),
    int8=INT8_OPS,
    shared_scale=(SHARED_SCALE_OPS - {"Identity"}) | {"Gather", "Expand", "Tile", "ReduceMax"},
    nearest_only=frozenset({"Resize"}),
    absorbed=frozenset({"Relu", "Clip"}),
    removed=frozenset({"Identity", "Dropout"}),
    float_reasons={
        "HardSwish": f"{_NO_INT8_KERNEL} (it becomes HardSigmoid * x in float)",
        "HardSigmoid": _NO_INT8_KERNEL,
        "Tanh": _NO_INT8_KERNEL,
        "Sub": _NO_INT8_KERNEL + " (only Add and Mul have QLinear kernels)",
        "Div": _NO_INT8_KERNEL + " (only Add and Mul have QLinear kernels)",
        "Pad": _NO_INT8_KERNEL + "; fold it into the next Conv's pads (fold-pad)",
        "ReduceMean": _NO_INT8_KERNEL + "; GlobalAveragePool has one (QLinearGlobalAveragePool)",
        "SpaceToDepth": "onnxruntime keeps its Q/DQ (DepthToSpace's are dropped)",
        "Relu": "the QuantizeLinear after it has a zero point above its type's minimum, so "
        "onnxruntime cannot drop the Relu into the clamp",
        "Clip": "its range does not cover the QuantizeLinear's range after it, so onnxruntime "
        "cannot drop it into the clamp",
        "Resize": "only nearest Resize runs on the integer tensor",
    },
    float_advice="keep {op} out of quantization (quantize-static{{exclude={op}}}), or replace it "
    "with an op the runtime runs on int8",
)

#: TVM targets: the Relax ONNX importer turns DequantizeLinear/QuantizeLinear into float
#: `dequantize`/`quantize` calls and the op between into its float op (constant weights are
#: dequantized at build time), so no QDQ island becomes an integer kernel. QOperator nodes do:
#: `legalize-quantized` spells QLinearConv/ConvInteger as convolutions of integer-valued
#: tensors (int8 VNNI kernels on x86-vnni), QLinearMatMul/MatMulInteger/QGemm as
#: MatMulInteger, QLinearGlobalAveragePool as an integer sum, QLinearAdd/QLinearMul by
#: onnxruntime's float formulas on int8 storage; the ops in `qoperator` below become
#: dequantize -> float op -> quantize.
TVM_RELAX = QdqKernels(
    runtime="TVM Relax (legalize-quantized)",
    removed=frozenset({"Identity", "Dropout"}),
    float_advice="TVM imports DequantizeLinear/QuantizeLinear as float dequantize/quantize; "
    "turn the island into QLinear ops first (convert-qoperator) so legalize-quantized keeps it "
    "integer, or compile the float model",
    qoperator={
        f"com.microsoft::{op}": "legalize-quantized spells it as DequantizeLinear, the float "
        "op and QuantizeLinear"
        for op in ("QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool", "QLinearSoftmax")
    }
    | {
        "com.microsoft::QLinearConcat": "legalize-quantized spells it as DequantizeLinear, a "
        "float Concat and QuantizeLinear"
    },
)


def kernels_for(target: Any) -> QdqKernels:
    """The fusion table of a `dsopt.backend.Target` (None: onnxruntime CPU).

    Targets lowered through TVM (`target.tvm` set) get `TVM_RELAX`; every other target runs
    the model in onnxruntime, whose CPU provider is the one measured (`ONNXRUNTIME_CPU`).
    """
    if target is not None and getattr(target, "tvm", None) is not None:
        return TVM_RELAX
    return ONNXRUNTIME_CPU
