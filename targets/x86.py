"""x86-64 CPUs through TVM's LLVM backend: the build machine's CPU, or a named ISA level."""

from __future__ import annotations

from dsopt.backend import TVM_PIPELINE, Target, lower_tvm, run_library

#: Relative cost per precision on a CPU with VNNI (int8 dot products) and no fp16 arithmetic.
_PRECISIONS_VNNI = {"float32": 1.0, "int8": 0.35, "int4-weight": 0.5, "float16": 2.0}
#: Without VNNI, int8 dot products take three AVX2/AVX-512 instructions instead of one.
_PRECISIONS = {"float32": 1.0, "int8": 0.6, "int4-weight": 0.5, "float16": 2.0}
_TRIPLE = "x86_64-linux-gnu"


def _x86(
    name: str, summary: str, mcpu: str | None, features: frozenset[str], **kw: object
) -> Target:
    return Target(
        name=name,
        summary=summary,
        pipeline=TVM_PIPELINE,
        tvm={"kind": "llvm", "mtriple": _TRIPLE, **({"mcpu": mcpu} if mcpu else {})},
        host_cpu=mcpu is None,
        cpu_features=features,
        link="host",
        schedules="dsopt",
        precisions=_PRECISIONS_VNNI if "avx512vnni" in features else _PRECISIONS,
        opset=21,
        lower=lower_tvm,
        run=run_library,
        **kw,  # type: ignore[arg-type]
    )


X86 = _x86(
    "x86",
    "this machine's x86-64 CPU (LLVM's name for it): a TVM-compiled model.so",
    None,
    frozenset(),
    aliases=("x86-host", "cpu"),
)
X86_AVX2 = _x86(
    "x86-avx2", "x86-64 with AVX2/FMA (Haswell and newer): model.so", "haswell", frozenset({"avx2"})
)
X86_AVX512 = _x86(
    "x86-avx512",
    "x86-64 with AVX-512 (Skylake-SP and newer): model.so",
    "skylake-avx512",
    frozenset({"avx2", "avx512f"}),
)
X86_VNNI = _x86(
    "x86-vnni",
    "x86-64 with AVX-512 VNNI int8 dot products (Cascade Lake and newer): model.so",
    "cascadelake",
    frozenset({"avx2", "avx512f", "avx512vnni"}),
    aliases=("x86-avx512-vnni",),
)

TARGETS = (X86, X86_AVX2, X86_AVX512, X86_VNNI)
