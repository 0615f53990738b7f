"""Mixed-precision assignment (`--precision mixed`): a precision per weight within a budget.

`sensitivity` measures each weight lowered alone (bytes, output error on calibration
samples, cached); `assign` picks a precision per weight greedily by predicted error energy
per byte saved and verifies the combined model; `plot` draws the measured candidates'
error vs size (the Pareto front) as a PNG beside report.json.
"""

from __future__ import annotations

from dsopt.mixed.assign import (
    Budget,
    MixedResult,
    Prediction,
    assign,
    check_error_budget,
    greedy,
    mixed_precision,
    parse_size_budget,
    target_candidates,
    uniform_assignment,
)
from dsopt.mixed.sensitivity import (
    CANDIDATES,
    Candidate,
    ErrorMeter,
    SensitivityCache,
    Unit,
    lower,
    measure,
    output_errors,
    upgrade_for_quantization,
    weight_units,
)

__all__ = [
    "CANDIDATES",
    "Budget",
    "Candidate",
    "ErrorMeter",
    "MixedResult",
    "Prediction",
    "SensitivityCache",
    "Unit",
    "assign",
    "check_error_budget",
    "greedy",
    "lower",
    "measure",
    "mixed_precision",
    "output_errors",
    "parse_size_budget",
    "target_candidates",
    "uniform_assignment",
    "upgrade_for_quantization",
    "weight_units",
]
