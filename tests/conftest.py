"""Shared pytest setup: hypothesis profiles and the --update-golden switch."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

from dsopt.testing.golden import UPDATE_ENV

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    deadline=None,
    max_examples=5000,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite golden .after files")


def pytest_configure(config):
    if config.getoption("--update-golden"):
        os.environ[UPDATE_ENV] = "1"
