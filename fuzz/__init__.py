"""Long-running fuzz campaigns built on dsopt.testing.strategies (run: python -m fuzz ...)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, seed, settings


def campaign_settings(examples: int, run_seed: int) -> Callable[[Any], Any]:
    """Hypothesis settings of a campaign: `examples` draws from `run_seed`, no deadline, no
    example database, no health checks (big random models are the point)."""

    def apply(test: Any) -> Any:
        configured = settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(test)
        return seed(run_seed)(configured)

    return apply
