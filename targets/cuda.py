"""NVIDIA GPUs on an x86-64 host through TVM's CUDA backend: one target per architecture."""

from __future__ import annotations

from dsopt.backend import TVM_PIPELINE, Target, lower_tvm, run_library

_HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
#: Per-block limits every sm_80+ GPU shares (TVM's own CUDA tags spell them; without them
#: each schedule rule warns and assumes the same values).
GPU_LIMITS = {
    "max_shared_memory_per_block": 49152,
    "max_threads_per_block": 1024,
    "thread_warp_size": 32,
    "registers_per_block": 65536,
}
#: Tensor Cores run fp16: the lossless pipeline, then weights and compute to float16.
FP16_PIPELINE = f"{TVM_PIPELINE},convert-float16"


def _cuda(
    arch: str, summary: str, precisions: dict[str, float], name: str | None = None, **kw: object
) -> Target:
    return Target(
        name=name or f"cuda-{arch.replace('_', '')}",
        summary=summary,
        tvm={"kind": "cuda", "arch": arch, **GPU_LIMITS, "host": dict(_HOST)},
        link="host",
        pipeline=FP16_PIPELINE,
        allow_lossy=True,
        precisions=precisions,
        opset=17,
        fused_ops=frozenset({"sparse-2:4"}),  # sparse tensor cores (Ampere+): sparsify-2to4
        lower=lower_tvm,
        run=run_library,
        **kw,  # type: ignore[arg-type]
    )


#: Every arch here (sm_80+) has bf16 tensor cores at fp16's rate.
_TENSOR_CORES = {
    "float16": 1.0, "bfloat16": 1.0, "float32": 4.0, "int8": 0.5, "int4-weight": 0.7,
}  # fmt: skip

CUDA_SM80 = _cuda(
    "sm_80", "NVIDIA Ampere A100 (sm_80): model.so with CUDA kernels", _TENSOR_CORES,
    name="cuda",
    aliases=("cuda-sm80", "cuda-a100"),
)  # fmt: skip
CUDA_SM86 = _cuda("sm_86", "NVIDIA Ampere RTX 30xx / A10 (sm_86): model.so", _TENSOR_CORES)
CUDA_SM89 = _cuda("sm_89", "NVIDIA Ada RTX 40xx / L4 (sm_89): model.so", _TENSOR_CORES)
CUDA_SM90 = _cuda(
    "sm_90", "NVIDIA Hopper H100 (sm_90): model.so", _TENSOR_CORES, aliases=("cuda-h100",)
)

TARGETS = (CUDA_SM80, CUDA_SM86, CUDA_SM89, CUDA_SM90)
