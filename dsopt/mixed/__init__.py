"""Mixed-precision assignment (`--precision mixed`): a precision per weight within a budget.

`sensitivity` measures each weight lowered alone (bytes, output error on calibration
samples, cached); `assign` picks a precision per weight greedily by error per byte saved and
verifies the combined model.
"""

from __future__ import annotations

from dsopt.mixed.assign import (
    Budget,
    MixedResult,
    assign,
    check_error_budget,
    greedy,
    mixed_precision,
    parse_size_budget,
    target_candidates,
)
from dsopt.mixed.sensitivity import (
    CANDIDATES,
    Candidate,
    ErrorMeter,
    SensitivityCache,
    Unit,
    lower,
    measure,
    weight_units,
)

__all__ = [
    "CANDIDATES",
    "Budget",
    "Candidate",
    "ErrorMeter",
    "MixedResult",
    "SensitivityCache",
    "Unit",
    "assign",
    "check_error_budget",
    "greedy",
    "lower",
    "measure",
    "mixed_precision",
    "parse_size_budget",
    "target_candidates",
    "weight_units",
]
