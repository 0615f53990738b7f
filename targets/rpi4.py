"""Raspberry Pi 4 (Cortex-A72, ARMv8.0-A: NEON, no dot product), through TVM's LLVM backend."""

from __future__ import annotations

from dsopt.backend import TVM_PIPELINE, Target, lower_tvm, run_library

RPI4 = Target(
    name="rpi4",
    pipeline=TVM_PIPELINE,
    aliases=("raspberry-pi-4",),
    summary="Raspberry Pi 4, Cortex-A72 NEON without dot product: model.so, or model.tar",
    tvm={
        "kind": "llvm",
        "mtriple": "aarch64-linux-gnu",
        "mcpu": "cortex-a72",
        "mattr": ["+neon"],
        "num-cores": 4,
    },
    link="cross",
    cross_compiler="aarch64-linux-gnu-g++",
    # No sdot: int8 still gains from 16 lanes per NEON register, less than with dot products.
    precisions={"float32": 1.0, "int8": 0.6, "int4-weight": 0.7, "float16": 1.5},
    opset=21,
    schedules="dsopt",
    lower=lower_tvm,
    run=run_library,
)
