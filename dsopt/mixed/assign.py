"""Choose a precision per weight: greedy by error per byte saved, verified on calibration data.

Starting from float32 everywhere, each step takes the move (one unit to a smaller candidate)
with the least predicted error increase per byte saved (or, once single moves can reach the
size budget, the one of those with the least error); bytes left under the budget then buy
back precision where the prediction gains most per byte. The prediction adds error
*energies* (`Prediction`): squared relative L2 errors and cosine deficits of the units'
candidates, as independent output noise does. Size mode stops once the weights fit the
budget; error mode keeps taking moves while the prediction stays within the error budget.
Every assignment is then measured on the calibration samples: in error mode the budget the
prediction is held to is rescaled by measured / predicted error and greedy reruns, tighter
after a miss and looser while there is room, a few rounds at most. The uniform presets
(all fp16, all int8, the int4 preset) and greedy at a few sizes (`SWEEP_POINTS`, the Pareto
plot's front) are measured too; of everything measured, the one
meeting the budgets with the least error (size budget) or fewest bytes (error budget) is
kept, so the result is never worse than a uniform precision that fits.
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
    INT4_BLOCKS,
    TARGET_PRECISIONS,
    Candidate,
    ErrorMeter,
    SensitivityCache,
    Unit,
    lower,
    measure,
    quantize_options,
    upgrade_for_quantization,
    weight_units,
)
from dsopt.pass_infra import PassContext

__all__ = [
    "Budget",
    "MixedResult",
    "Prediction",
    "assign",
    "check_error_budget",
    "greedy",
    "mixed_precision",
    "parse_size_budget",
    "target_candidates",
    "uniform_assignment",
]

logger = logging.getLogger(__name__)

#: Verification rounds in error mode (greedy rerun with a rescaled error budget).
BACKOFF_ROUNDS = 6
#: Extra greedy assignments measured at sizes between the smallest and fp16's, for the front.
SWEEP_POINTS = 4
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
    """Candidate precisions a target runs at least as fast as float32 (all without a target).

    A precision the target declares slower than float32 (fp16 arithmetic on x86 or a
    Cortex-A72) is never a candidate; where fp16 compute is slower, fp16 *storage*
    (`fp16-weights`: half the bytes, float32 compute) takes its place.
    """
    if precisions is None:
        return CANDIDATES
    fp32_cost = precisions.get("float32", 1.0)
    allowed = {"fp32"}
    for key, cost in precisions.items():
        candidate = TARGET_PRECISIONS.get(key)
        if candidate is not None and cost <= fp32_cost:
            allowed.add(candidate)
        elif candidate == "fp16":
            allowed.add("fp16-weights")
    if "int4" in allowed:
        allowed |= set(INT4_BLOCKS)
    return tuple(p for p in CANDIDATES if p in allowed)


@dataclasses.dataclass
class Move:
    """One step of the greedy path."""

    unit: str
    precision: str
    saved: int
    error: float


@dataclasses.dataclass
class Prediction:
    """The combined error the units' candidates predict: error energies add.

    Weights perturb the outputs by roughly independent noise, so squared relative L2 errors
    add (the combined relative L2 is the root of the sum) and so do cosine deficits
    (`1 - cos ~ rel^2 / 2` for small errors). Summing the relative L2 errors themselves would
    predict n times too much for n weights of equal error (sqrt(n) times the root-sum-square)
    and stop error mode far too early. `slack` scales the error budget the prediction is
    held to: the verification's measured / predicted ratio corrects it.
    """

    energy: float = 0.0
    deficit: float = 0.0

    @staticmethod
    def delta(now: Candidate, cand: Candidate) -> tuple[float, float]:
        """(energy, deficit) added by moving a unit from `now` to `cand` (never negative)."""
        return (
            max(cand.rel_l2**2 - now.rel_l2**2, 0.0),
            max(now.cosine - cand.cosine, 0.0),
        )

    @classmethod
    def of(cls, units: Sequence[Unit], chosen: Mapping[str, str]) -> Prediction:
        """The prediction of an assignment."""
        out = cls()
        for unit in units:
            energy, deficit = cls.delta(unit.candidates["fp32"], unit.candidates[chosen[unit.name]])
            out.energy += energy
            out.deficit += deficit
        return out

    @property
    def rel_l2(self) -> float:
        """Predicted relative L2 error."""
        return math.sqrt(self.energy)

    def fits(self, budget: Budget, energy: float, deficit: float, slack: float) -> bool:
        """Whether adding (energy, deficit) keeps the error budget (scaled by `slack`)."""
        if budget.max_error is not None and self.energy + energy > (budget.max_error * slack) ** 2:
            return False
        return (
            budget.min_cosine is None or self.deficit + deficit <= (1 - budget.min_cosine) * slack
        )


def _cost(energy: float, deficit: float) -> float:
    """One error scale for ranking moves (2 * deficit ~ energy for small errors)."""
    return energy + 2 * deficit


def greedy(
    units: Sequence[Unit],
    budget: Budget,
    *,
    banned: frozenset[tuple[str, str]] = frozenset(),
    slack: float = 1.0,
) -> tuple[dict[str, str], list[Move], list[tuple[int, float]]]:
    """The greedy assignment: (unit -> precision, moves taken, path of (bytes, predicted rel L2)).

    Moves are taken by least predicted error energy per byte saved (`Prediction`). With a
    size budget, every state on that path where one move alone would reach the budget also
    offers "finish with the least-error such move"; the finished state with the least
    predicted error wins (a big saving on a sensitive weight must not beat a few small
    ones). `banned` (unit, precision) pairs are never taken; `slack` scales the error budget.
    """
    chosen = {u.name: "fp32" for u in units}
    total = sum(u.fp32_bytes for u in units)
    state = Prediction()
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
                energy, deficit = Prediction.delta(now, cand)
                if not state.fits(budget, energy, deficit, slack):
                    continue
                cost = _cost(energy, deficit)
                if best is None or (cost / saved, -saved) < (best[0], -best[1]):
                    best = (cost / saved, saved, unit, precision)
                if needed is not None and saved >= needed:
                    if finish is None or (cost, -saved) < (finish[0], -finish[1]):
                        finish = (cost, saved, unit, precision)
        if finish is not None:
            cost, saved, unit, precision = finish
            now = unit.candidates[chosen[unit.name]]
            step = Move(unit.name, precision, saved, unit.candidates[precision].rel_l2 - now.rel_l2)
            score = _cost(state.energy, state.deficit) + cost
            finished.append((score, {**chosen, unit.name: precision}, [*moves, step]))
        if best is None:
            break
        _, saved, unit, precision = best
        now = unit.candidates[chosen[unit.name]]
        cand = unit.candidates[precision]
        energy, deficit = Prediction.delta(now, cand)
        state.energy += energy
        state.deficit += deficit
        chosen[unit.name] = precision
        total -= saved
        moves.append(Move(unit.name, precision, saved, cand.rel_l2 - now.rel_l2))
        path.append((total, state.rel_l2))
    if budget.size is not None and total <= budget.size:
        finished.append((_cost(state.energy, state.deficit), chosen, moves))
    if finished:
        _, chosen, moves = min(finished, key=lambda option: option[0])
    return chosen, moves, path


def assign(
    units: Sequence[Unit],
    budget: Budget,
    *,
    banned: frozenset[tuple[str, str]] = frozenset(),
    slack: float = 1.0,
) -> dict[str, str]:
    """The greedy assignment meeting `budget.size` (prediction only).

    Raises:
        UsageError: The size budget is below the smallest reachable size.
    """
    chosen, _, _ = greedy(units, budget, banned=banned, slack=slack)
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

    Takes the upgrade with the largest predicted error-energy reduction per byte that still
    fits, until none fits; the error budget's prediction can only improve.
    """
    assert budget.size is not None
    total = sum(u.candidates[chosen[u.name]].bytes for u in units)
    while True:
        best: tuple[float, Unit, str, int] | None = None
        for unit in units:
            now = unit.candidates[chosen[unit.name]]
            for precision, cand in unit.candidates.items():
                extra = cand.bytes - now.bytes
                gain = _cost(*Prediction.delta(cand, now))
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
                        p: {
                            "bytes": c.bytes,
                            "rel_l2": c.rel_l2,
                            "cosine": c.cosine,
                            "sqnr_db": _json_db(c.sqnr_db),
                        }
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
    notes = upgrade_for_quantization(base, precisions, ctx)
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
    chosen = assign(units, budget)  # raises when the size budget is out of reach
    tried: list[_Tried] = []

    def run(label: str, assignment: dict[str, str]) -> _Tried:
        module, sizes = lower(reference, units, assignment, ctx, block_size=block_size)
        rel, cos = meter.measure(module.to_proto())
        entry = _Tried(label, dict(assignment), sizes, rel, cos, module)
        tried.append(entry)
        return entry

    last = run("greedy", chosen)
    slack = 1.0
    for _ in range(BACKOFF_ROUNDS):
        if not budget.has_error:
            break
        # Verification: rescale the error budget the prediction is held to by how far the
        # prediction was off, tighter after a miss, looser while there is room.
        predicted = Prediction.of(units, last.assignment)
        ratios = []
        if budget.max_error is not None:
            ratios.append(_ratio(predicted.rel_l2, last.rel_l2))
        if budget.min_cosine is not None:
            ratios.append(_ratio(predicted.deficit, 1 - last.cosine))
        ok = budget.error_ok(last.rel_l2, last.cosine)
        new = min(ratios)
        new = min(new, 0.8 * slack) if not ok else new
        if ok and new <= slack * 1.05:
            break  # no room worth another round
        slack = new
        try:
            chosen = assign(units, budget, slack=slack)
        except UsageError:
            break
        if any(t.assignment == chosen for t in tried):
            if ok:
                break
            slack *= 0.5  # the same assignment missed: tighten harder
            continue
        last = run("verified" if ok else "backoff", chosen)
        notes.append(
            f"measured rel L2 {tried[-2].rel_l2:.4g} {'within' if ok else 'over'} budget: "
            f"prediction's error budget scaled by {slack:.3g}"
        )
    for precision in precisions:
        if precision not in ("fp32", "int4-b128"):  # the presets' precisions
            uniform = uniform_assignment(units, precision)
            if set(uniform.values()) - {"fp32"}:
                _ = run(f"uniform-{precision}", uniform)
    # A few more points for the Pareto front (and the choice): greedy at sizes between the
    # smallest reachable and uniform fp16's, whatever the budget.
    smallest = sum(min(c.bytes for c in u.candidates.values()) for u in units)
    for step in range(1, SWEEP_POINTS + 1):
        size = int(smallest + (_fp32(units) / 2 - smallest) * step / (SWEEP_POINTS + 1))
        try:
            sweep = assign(units, Budget(size=size))
        except UsageError:
            continue
        if all(t.assignment != sweep for t in tried):
            _ = run("sweep", sweep)
    best = _best(tried, budget)
    if best is None:  # nothing meets the budgets: the last greedy try, with a warning
        best = last
        if budget.has_error and not budget.error_ok(best.rel_l2, best.cosine):
            notes.append("error budget missed after back-off")
            logger.warning(
                "--precision mixed: error budget missed (rel L2 %.4g, cos %.5f)",
                best.rel_l2,
                best.cosine,
            )
        if budget.size is not None and sum(best.sizes.values()) > budget.size:
            notes.append("size budget missed after back-off")
            logger.warning("--precision mixed: size budget missed after backing off error")
    elif best.label.startswith("uniform-"):
        notes.append(f"{best.label} measured better than the greedy assignment; kept it")
    pareto = [_point(t.label, t.sizes, t.rel_l2, t.cosine) for t in tried]
    pareto.append(_point("fp32", {u.name: u.fp32_bytes for u in units}, 0.0, 1.0))
    pareto[tried.index(best)]["chosen"] = True
    _mark_front(pareto)
    passes = _passes(best.assignment.values(), block_size)
    return MixedResult(
        best.module,
        units,
        best.assignment,
        best.sizes,
        budget,
        best.rel_l2,
        best.cosine,
        len(meter.feeds),
        pareto,
        notes,
        passes,
    )


@dataclasses.dataclass
class _Tried:
    """An assignment lowered and measured on the calibration samples."""

    label: str
    assignment: dict[str, str]
    sizes: dict[str, int]
    rel_l2: float
    cosine: float
    module: Module


def _json_db(value: float | None) -> float | str | None:
    """A decibel figure for JSON: rounded, or "inf" for an exact output (JSON has no inf)."""
    if value is None or math.isnan(value):
        return None
    return round(value, 3) if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _ratio(predicted: float, measured: float) -> float:
    """The slack under which the prediction reaches the budget where the measurement would.

    Greedy holds the prediction to slack * budget; measured ~ predicted / ratio, so a slack
    of predicted / measured lets the measured error reach the budget. Capped at 16x either way.
    """
    if measured <= 0:
        return 16.0  # measured exact: loosen a lot
    return min(max(predicted / measured, 1 / 16), 16.0) if predicted > 0 else 1.0


def _best(tried: Sequence[_Tried], budget: Budget) -> _Tried | None:
    """The measured assignment meeting every budget, None when none does.

    Under a size budget the least error wins, else the fewest bytes.
    """
    ok = [
        t
        for t in tried
        if budget.error_ok(t.rel_l2, t.cosine)
        and (budget.size is None or sum(t.sizes.values()) <= budget.size)
    ]
    if not ok:
        return None
    if budget.size is not None:
        return min(ok, key=lambda t: (t.rel_l2, 1 - t.cosine, sum(t.sizes.values())))
    return min(ok, key=lambda t: (sum(t.sizes.values()), t.rel_l2))


def uniform_assignment(units: Sequence[Unit], precision: str) -> dict[str, str]:
    """What `--precision PRECISION` alone would store, per unit.

    Each unit at `precision` where it is a candidate; for int4 (as the preset) int8 where
    int4 is not (Conv); else float32.
    """
    order = (precision, "int8") if precision == "int4" else (precision,)
    return {u.name: next((p for p in order if p in u.candidates), "fp32") for u in units}


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
    if "bf16" in used:  # a wider bound than fp16's
        out.append(ConvertFloat16(dtype="bfloat16"))
    if "fp16-weights" in used:
        out.append(ConvertFloat16(weights_only=True))
    for precision in ("int8", *INT4_BLOCKS):
        if precision in used:
            out.append(QuantizeWeights(**quantize_options(precision, block_size)))
    return out
