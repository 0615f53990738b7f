"""NVIDIA Jetson Orin: CUDA sm_87 device with an aarch64 Cortex-A78AE host."""

from __future__ import annotations

from dsopt.backend import Target, lower_tvm, run_library
from dsopt.targets.cuda import FP16_PIPELINE, GPU_LIMITS

JETSON_ORIN = Target(
    name="jetson-orin",
    aliases=("jetson",),
    summary="Jetson Orin (CUDA sm_87, Cortex-A78AE host): model.so with CUDA kernels",
    # TVM's `nvidia/jetson-orin-nano` tag names the Xavier host CPU (carmel); Orin's is A78AE.
    tvm={
        "kind": "cuda",
        "arch": "sm_87",
        **GPU_LIMITS,
        "host": {
            "kind": "llvm",
            "mtriple": "aarch64-linux-gnu",
            "mcpu": "cortex-a78ae",
            "mattr": ["+neon", "+dotprod"],
        },
    },
    link="cross",
    cross_compiler="aarch64-linux-gnu-g++",
    pipeline=FP16_PIPELINE,
    allow_lossy=True,
    # Ampere (sm_87) tensor cores run bf16 at fp16's rate.
    precisions={"float16": 1.0, "bfloat16": 1.0, "float32": 2.0, "int8": 0.6, "int4-weight": 0.8},
    opset=17,
    fused_ops=frozenset({"sparse-2:4"}),  # sparse tensor cores (Ampere): sparsify-2to4
    lower=lower_tvm,
    run=run_library,
)
