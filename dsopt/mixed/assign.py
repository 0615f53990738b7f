"""Choose a precision per weight: greedy by error per byte saved, verified on calibration data.

Starting from float32 everywhere, each step takes the move (one unit to a smaller candidate)
with the least predicted error increase per byte saved (or, once single moves can reach the
size budget, the one of those with the least error); bytes left under the budget then buy
back precision where the prediction gains most per byte. The prediction is additive: the
relative L2 errors of the units' candidates add up (and so do `1 - cosine`). Size mode stops
once the weights fit the budget; error mode keeps taking moves while the prediction stays
within the error budget. The combined model is then measured on the calibration samples; if
it misses the error budget, the moves that cost the most error are undone, a few rounds at
most.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from dsopt.errors import UsageError
from dsopt.ir import Module
from dsopt.mixed.sensitivity import (
    CANDIDATES,
    TARGET_PRECISIONS,
    ErrorMeter,
    SensitivityCache,
    Unit,
    lower,
    measure,
    weight_units,
)
from dsopt.pass_infra import PassContext

__all__ = [
    "Budget",
    "MixedResult",
    "assign",
    "check_error_budget",
    "greedy",
    "mixed_precision",
    "parse_size_budget",
    "target_candidates",
]

logger = logging.getLogger(__name__)

#: Rounds of undoing moves when the combined model misses the error budget.
BACKOFF_ROUNDS = 6
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 1024, "MIB": 1 << 20}
_UNITS["GIB"] = 1 << 30


@dataclasses.dataclass(frozen=True)
class Budget:
    """What the assignment must meet: weight bytes and/or output error on calibration data."""

    size: int | None = None
    max_error: float | None = None
    min_cosine: float | None = None

    @property
    def has_error(self) -> bool:
        """Whether an error budget is set."""
        return self.max_error is not None or self.min_cosine is not None

    def error_ok(self, rel_l2: float, cosine: float) -> bool:
        """Whether a (relative L2, cosine) pair meets the error budget."""
        if self.max_error is not None and not rel_l2 <= self.max_error:
            return False
        return self.min_cosine is None or cosine >= self.min_cosine


def parse_size_budget(text: str | float, fp32_bytes: int) -> int:
    """`--size-budget` in bytes: a fraction in (0, 1] of `fp32_bytes` or a size (12MB).

    Raises:
        UsageError: Not a fraction in (0, 1] nor a positive size with a known unit.
    """
    raw = str(text).strip()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)", raw)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise UsageError(
            f"--size-budget {raw!r} is neither a fraction nor a size",
            hint="give a fraction of the float32 weight bytes (0.15) or a size (12MB, 500KB)",
        )
    value = float(match.group(1))
    if not unit:
        if not 0 < value <= 1:
            raise UsageError(
                f"--size-budget {raw} must be a fraction in (0, 1] or carry a unit",
                hint="e.g. 0.25 (a quarter of the float32 weights) or 12MB",
            )
        return int(value * fp32_bytes)
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"--size-budget {raw} must be positive", hint="e.g. 12MB")
    return size


def check_error_budget(max_error: float | None, min_cosine: float | None) -> None:
    """Raises UsageError for a `--max-error` or `--min-cosine` out of range."""
    if max_error is not None and not (0 < max_error < math.inf):
        raise UsageError(
            f"--max-error {max_error} must be a positive relative L2 error",
            hint="e.g. --max-error 0.01",
        )
    if min_cosine is not None and not (-1 < min_cosine < 1):
        raise UsageError(
            f"--min-cosine {min_cosine} must lie in (-1, 1)", hint="e.g. --min-cosine 0.995"
        )


def target_candidates(precisions: Mapping[str, float] | None) -> tuple[str, ...]:
    """Candidate precisions a target allows (all without a target)."""
    if precisions is None:
        return CANDIDATES
    allowed = {TARGET_PRECISIONS[k] for k in precisions if k in TARGET_PRECISIONS}
    return tuple(p for p in CANDIDATES if p in allowed | {"fp32"})


@dataclasses.dataclass
class Move:
    """One step of the greedy path."""

    unit: str
    precision: str
    saved: int
    error: float


def greedy(
    units: Sequence[Unit], budget: Budget, *, banned: frozenset[tuple[str, str]] = frozenset()
) -> tuple[dict[str, str], list[Move], list[tuple[int, float]]]:
    """The greedy assignment: (unit -> precision, moves taken, path of (bytes, predicted error)).

    Moves are taken by least predicted error per byte saved. With a size budget, every state
    on that path where one move alone would reach the budget also offers "finish with the
    least-error such move"; the finished state with the least predicted error wins (a big
    saving on a sensitive weight must not beat a few small ones). `banned` (unit,
    precision) pairs are never taken.
    """
    chosen = {u.name: "fp32" for u in units}
    total = sum(u.fp32_bytes for u in units)
    rel = one_minus_cos = 0.0
    moves: list[Move] = []
    path = [(total, 0.0)]
    finished: list[tuple[float, dict[str, str], list[Move]]] = []
    while budget.size is None or total > budget.size:
        best: tuple[float, int, Unit, str] | None = None
        finish: tuple[float, int, Unit, str] | None = None
        needed = total - budget.size if budget.size is not None else None
        for unit in units:
            now = unit.candidates[chosen[unit.name]]
            for precision, cand in unit.candidates.items():
                saved = now.bytes - cand.bytes
                if saved <= 0 or (unit.name, precision) in banned:
                    continue
                d_rel = max(cand.rel_l2 - now.rel_l2, 0.0)
                d_cos = max(now.cosine - cand.cosine, 0.0)
                if budget.max_error is not None and rel + d_rel > budget.max_error:
                    continue
                if budget.min_cosine is not None and (
                    one_minus_cos + d_cos > 1 - budget.min_cosine
                ):
                    continue
                key = (d_rel + d_cos) / saved
                if best is None or (key, -saved) < (best[0], -best[1]):
                    best = (key, saved, unit, precision)
                cost = d_rel + d_cos
                if needed is not None and saved >= needed:
                    if finish is None or (cost, -saved) < (finish[0], -finish[1]):
                        finish = (cost, saved, unit, precision)
        if finish is not None:
            cost, saved, unit, precision = finish
            now = unit.candidates[chosen[unit.name]]
            step = Move(unit.name, precision, saved, unit.candidates[precision].rel_l2 - now.rel_l2)
            finished.append(
                (rel + one_minus_cos + cost, {**chosen, unit.name: precision}, [*moves, step])
            )
        if best is None:
            break
        _, saved, unit, precision = best
        now = unit.candidates[chosen[unit.name]]
        cand = unit.candidates[precision]
        rel += max(cand.rel_l2 - now.rel_l2, 0.0)
        one_minus_cos += max(now.cosine - cand.cosine, 0.0)
        chosen[unit.name] = precision
        total -= saved
        moves.append(Move(unit.name, precision, saved, cand.rel_l2 - now.rel_l2))
        path.append((total, rel))
    if budget.size is not None and total <= budget.size:
        finished.append((rel + one_minus_cos, chosen, moves))
    if finished:
        _, chosen, moves = min(finished, key=lambda option: option[0])
    return chosen, moves, path


def assign(units: Sequence[Unit], budget: Budget) -> dict[str, str]:
    """The greedy assignment meeting `budget.size` (prediction only).

    Raises:
        UsageError: The size budget is below the smallest reachable size.
    """
    chosen, _, _ = greedy(units, budget)
    total = sum(u.candidates[chosen[u.name]].bytes for u in units)
    if budget.size is not None and total > budget.size:
        smallest = sum(min(c.bytes for c in u.candidates.values()) for u in units)
        what = "within the error budget" if budget.has_error else "at all"
        raise UsageError(
            f"--size-budget {budget.size} bytes cannot be reached {what} (smallest reachable: "
            f"{smallest if not budget.has_error else total} bytes of {_fp32(units)} float32)",
            hint="raise --size-budget, loosen --max-error/--min-cosine, allow int4, or use a "
            "larger --block-size (int4 scales: 4 bytes per block)",
        )
    if budget.size is not None:
        _refine(units, chosen, budget)
    return chosen


def _refine(units: Sequence[Unit], chosen: dict[str, str], budget: Budget) -> None:
    """Spends bytes greedy left under the size budget: moves units back to better candidates.

    Takes the upgrade with the largest predicted error reduction per byte that still fits,
    until none fits; the error budget's prediction can only improve.
    """
    assert budget.size is not None
    total = sum(u.candidates[chosen[u.name]].bytes for u in units)
    while True:
        best: tuple[float, Unit, str, int] | None = None
        for unit in units:
            now = unit.candidates[chosen[unit.name]]
            for precision, cand in unit.candidates.items():
                extra = cand.bytes - now.bytes
                gain = now.rel_l2 - cand.rel_l2 + cand.cosine - now.cosine
                if extra <= 0 or gain <= 0 or total + extra > budget.size:
                    continue
                if best is None or gain / extra > best[0]:
                    best = (gain / extra, unit, precision, extra)
        if best is None:
            return
        _, unit, precision, extra = best
        chosen[unit.name] = precision
        total += extra


def _fp32(units: Sequence[Unit]) -> int:
    return sum(u.fp32_bytes for u in units)


@dataclasses.dataclass
class MixedResult:
    """The assigned model and what led to it (report.json's `mixed` entry)."""

    module: Module
    units: list[Unit]
    assignment: dict[str, str]
    sizes: dict[str, int]
    budget: Budget
    rel_l2: float
    cosine: float
    samples: int
    pareto: list[dict[str, Any]]
    notes: list[str] = dataclasses.field(default_factory=list)
    passes: list[Any] = dataclasses.field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Weight bytes of the units as assigned."""
        return sum(self.sizes.values())

    def to_dict(self) -> dict[str, Any]:
        """The per-node table, totals against the budget and the Pareto points."""
        nodes = []
        for unit in self.units:
            nodes.append(
                {
                    "node": unit.name,
                    "op": unit.op,
                    "precision": self.assignment[unit.name],
                    "bytes": self.sizes[unit.name],
                    "sensitivity": {
                        p: {"bytes": c.bytes, "rel_l2": c.rel_l2, "cosine": c.cosine}
                        for p, c in unit.candidates.items()
                    },
                }
            )
        counts: dict[str, int] = {}
        for precision in self.assignment.values():
            counts[precision] = counts.get(precision, 0) + 1
        return {
            "nodes": nodes,
            "counts": counts,
            "fp32_bytes": _fp32(self.units),
            "bytes": self.total_bytes,
            "budget": dataclasses.asdict(self.budget),
            "rel_l2": self.rel_l2,
            "cosine": self.cosine,
            "samples": self.samples,
            "pareto": self.pareto,
            "notes": self.notes,
        }


def mixed_precision(
    module: Module,
    calibration: Any,
    budget: Budget,
    ctx: PassContext,
    *,
    precisions: Sequence[str] = CANDIDATES,
    samples: int = 8,
    block_size: int | None = None,
    cache: SensitivityCache | None = None,
    size_budget: str | float | None = None,
) -> MixedResult:
    """Assigns a precision per weight of `module` (unchanged) within `budget`.

    `size_budget` (the `--size-budget` text) overrides `budget.size`, resolved against the
    float32 bytes of the weights.

    Raises:
        UsageError: No weight to assign, no budget, or a budget that cannot be met.
    """
    base = module.clone()
    units = weight_units(base)
    if not units:
        raise UsageError(
            "--precision mixed: the model has no constant float32 MatMul/Gemm/Conv/Gather "
            "weight to assign a precision to"
        )
    if size_budget is not None:
        budget = dataclasses.replace(budget, size=parse_size_budget(size_budget, _fp32(units)))
    if budget.size is None and not budget.has_error:
        raise UsageError(
            "--precision mixed needs a budget",
            hint="give --size-budget (0.25 or 12MB), --max-error or --min-cosine",
        )
    check_error_budget(budget.max_error, budget.min_cosine)
    reference = base.to_proto()  # lowered from, and the outputs' reference
    meter = ErrorMeter(reference, list(calibration.limited(samples)))
    measure(base, units, precisions, meter, ctx, block_size=block_size, cache=cache)
    chosen = assign(units, budget)
    notes: list[str] = []
    banned: set[tuple[str, str]] = set()
    lowered, sizes = lower(reference, units, chosen, ctx, block_size=block_size)
    rel, cos = meter.measure(lowered.to_proto())
    pareto = [_point("greedy", sizes, rel, cos)]
    for _ in range(BACKOFF_ROUNDS):
        if not budget.has_error or budget.error_ok(rel, cos):
            break
        # Undo the worst moves: ban the most sensitive chosen candidates and rerun greedy.
        worst = sorted(
            (u for u in units if chosen[u.name] != "fp32"),
            key=lambda u: -u.candidates[chosen[u.name]].rel_l2,
        )
        if not worst:
            break
        for unit in worst[: max(1, len(worst) // 4)]:
            banned.add((unit.name, chosen[unit.name]))
        chosen, _, _ = greedy(units, budget, banned=frozenset(banned))
        lowered, sizes = lower(reference, units, chosen, ctx, block_size=block_size)
        rel, cos = meter.measure(lowered.to_proto())
        pareto.append(_point("backoff", sizes, rel, cos))
        notes.append(f"measured error over budget; undid {len(banned)} moves")
    if budget.has_error and not budget.error_ok(rel, cos):
        notes.append("error budget missed after back-off")
        logger.warning("--precision mixed: error budget missed (rel L2 %.4g, cos %.5f)", rel, cos)
    if budget.size is not None and sum(sizes.values()) > budget.size:
        notes.append("size budget missed after back-off")
        logger.warning("--precision mixed: size budget missed after backing off error")
    for precision in precisions:
        if precision == "fp32":
            continue
        uniform = {u.name: precision for u in units if precision in u.candidates}
        if uniform:
            model, usizes = lower(reference, units, uniform, ctx, block_size=block_size)
            urel, ucos = meter.measure(model.to_proto())
            pareto.append(_point(f"uniform-{precision}", usizes, urel, ucos))
    pareto.append(_point("fp32", {u.name: u.fp32_bytes for u in units}, 0.0, 1.0))
    _mark_front(pareto)
    passes = _passes(chosen.values(), block_size)
    return MixedResult(
        lowered, units, chosen, sizes, budget, rel, cos, len(meter.feeds), pareto, notes, passes
    )


def _point(label: str, sizes: Mapping[str, int], rel: float, cos: float) -> dict[str, Any]:
    return {"label": label, "bytes": sum(sizes.values()), "rel_l2": rel, "cosine": cos}


def _mark_front(points: list[dict[str, Any]]) -> None:
    """Sets `pareto: bool` on each point: no other is both smaller and more accurate."""
    for p in points:
        p["pareto"] = not any(
            q is not p
            and q["bytes"] <= p["bytes"]
            and q["rel_l2"] <= p["rel_l2"]
            and (q["bytes"] < p["bytes"] or q["rel_l2"] < p["rel_l2"])
            for q in points
        )


def _passes(precisions: Any, block_size: int | None) -> list[Any]:
    """Pass instances whose numerics the assigned model carries (for the check's bound)."""
    from dsopt.passes.convert_float16 import ConvertFloat16
    from dsopt.passes.quantize_weights import QuantizeWeights

    used = set(precisions)
    out: list[Any] = []
    if "fp16" in used:
        out.append(ConvertFloat16())
    if "int8" in used:
        out.append(QuantizeWeights(bits=8))
    if "int4" in used:
        out.append(QuantizeWeights(bits=4, block_size=block_size or 32))
    return out
