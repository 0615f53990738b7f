"""`--precision` presets: the passes that lower a cleaned-up model to fewer bits.

The lossless pipeline runs first, to its fixed point; the precision passes then run once, in
order, so a later round of folding can never undo a quantization (folding a DequantizeLinear
of an int8 weight back into float32, say).
"""

from __future__ import annotations

from dsopt.errors import UsageError

__all__ = ["PRECISIONS", "precision_passes"]

#: What each preset does, for `--help` and errors.
PRECISIONS: dict[str, str] = {
    "fp32": "no precision change (default)",
    "fp16": "float16 weights and compute, float32 where fp16 would overflow (with --calib: "
    "also nodes whose measured ranges pass 65504/16)",
    "bf16": "bfloat16 weights and compute (float32's range: only long reductions and "
    "normalization statistics stay float32; for GPUs with bf16 tensor cores, sm_80+)",
    "int8": "static int8 from --calib (Q/DQ the runtime fuses); without --calib: int8-dynamic",
    "int8-dynamic": "int8 MatMul/Gemm weights, activations quantized at run time (with --calib: "
    "activation outliers smoothed into the weights first)",
    "int4": "4-bit block-wise MatMul/Gemm and embedding weights, int8 per-channel Conv weights "
    "(--block-size, default 32; with --calib: GPTQ rounding)",
    "mixed": "a precision per weight (fp32/fp16/bf16/fp16-weights/int8/int4) within "
    "--size-budget, --max-error or --min-cosine, chosen from per-weight sensitivity on --calib "
    "(`dsopt.mixed`)",
}

#: Lossless passes that hide ops from quantization: com.microsoft float fusions.
FLOAT_ONLY_PASSES = ("fuse-contrib-ops",)


def precision_passes(
    precision: str | None,
    *,
    calibrated: bool,
    block_size: int | None = None,
    legalize: bool = False,
) -> str | None:
    """The pipeline text the precision stage runs, or None for fp32.

    Args:
        precision: A key of `PRECISIONS` (None: fp32).
        calibrated: Whether calibration data was given (static int8 needs it).
        block_size: Block size of int4 weights.
        legalize: Append `legalize-quantized` (TVM targets lower quantized ops with it).

    Raises:
        UsageError: Unknown precision, or a block size given for another precision.
    """
    if precision in (None, "fp32"):
        return None
    if precision not in PRECISIONS:
        raise UsageError(
            f"--precision {precision} is unknown",
            hint="choose one of " + ", ".join(PRECISIONS),
        )
    if block_size is not None and precision not in ("int4", "mixed"):
        raise UsageError(f"--block-size applies to --precision int4, not {precision}")
    if precision == "fp16":
        return "convert-float16"
    if precision == "bf16":
        return "convert-float16{dtype=bfloat16}"
    if precision == "mixed":
        # dsopt.mixed lowers the weights itself; the stage only folds and cleans up after it.
        return "fold-qdq,eliminate-dead" + (",legalize-quantized" if legalize else "")
    # quantize-static/-dynamic store 7-bit weights (`reduce_range`) on every target: the model
    # must compute the same in onnxruntime on any x86 CPU, which is also the reference a TVM
    # library is checked against (its u8s8 kernels saturate without VNNI).
    if precision == "int8" and calibrated:
        text = "upgrade-opset{to=13},quantize-static,quantize-weights{bits=8}"
    elif precision in ("int8", "int8-dynamic"):
        # With calibration data, activation outliers move into the weights first (SmoothQuant).
        smooth = "smooth-activations," if calibrated else ""
        text = smooth + "quantize-dynamic,quantize-weights{bits=8}"
    else:
        block = f",block_size={block_size}" if block_size is not None else ""
        block += ",method=gptq" if calibrated else ""  # error-minimizing rounding from data
        # Conv weights take int8 per channel: 4-bit convs cost PP-OCR rec all of its character
        # accuracy (its stem alone: rel L2 0.32); `--precision mixed` gives int4 convs where
        # they measure safe.
        text = f"quantize-weights{{bits=4,convs=false{block}}},quantize-weights{{bits=8}}"
    text += ",fold-qdq,eliminate-dead"
    return text + (",legalize-quantized" if legalize else "")
