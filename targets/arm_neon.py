"""Generic 64-bit ARM (ARMv8.2-A) with NEON and int8 dot products, through TVM's LLVM backend."""

from __future__ import annotations

from dsopt.backend import TVM_PIPELINE, Target, lower_tvm, run_library

ARM_NEON = Target(
    name="arm-neon",
    pipeline=TVM_PIPELINE,
    aliases=("aarch64",),
    summary="aarch64 Linux with NEON + dot product (ARMv8.2-A): model.so, or model.tar of objects",
    tvm={
        "kind": "llvm",
        "mtriple": "aarch64-linux-gnu",
        "mcpu": "cortex-a76",
        "mattr": ["+neon", "+dotprod"],
    },
    link="cross",
    cross_compiler="aarch64-linux-gnu-g++",
    precisions={"float32": 1.0, "int8": 0.35, "int4-weight": 0.5, "float16": 0.6},
    opset=21,
    schedules="dsopt",
    lower=lower_tvm,
    run=run_library,
)
