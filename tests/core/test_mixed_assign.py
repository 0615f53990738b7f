"""The candidate precisions a target offers the assignment."""

from __future__ import annotations

from dsopt.mixed import CANDIDATES, target_candidates
from dsopt.targets.cuda import TARGETS as CUDA_TARGETS
from dsopt.targets.jetson import JETSON_ORIN
from dsopt.targets.rpi4 import RPI4
from dsopt.targets.x86 import X86_VNNI


def test_target_candidates_follow_declared_costs():
    assert target_candidates(None) == CANDIDATES
    x86 = target_candidates(X86_VNNI.precisions)  # fp16 arithmetic costs 2x float32 there
    assert "fp16" not in x86 and {"int8", "int4", "int4-b128"} <= set(x86)
    rpi4 = target_candidates(RPI4.precisions)
    assert "fp16" not in rpi4 and "int8" in rpi4
    if "fp16-weights" in CANDIDATES:  # storage-only fp16 replaces fp16 compute
        assert "fp16-weights" in x86 and "fp16-weights" in rpi4
    for target in (*CUDA_TARGETS, JETSON_ORIN):  # tensor cores: fp16 compute is the fast path
        candidates = target_candidates(target.precisions)
        assert "fp16" in candidates and "fp16-weights" not in candidates
