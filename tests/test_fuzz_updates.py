"""Property-based fuzzing of the server's aggregation: crafted replies never crash a round nor move the model off the honest aggregate."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings

from simulations.fuzz_replies import Case, cases, check_case

SUITE_CASES = 2000  # bounded for the suite (≈ tens of seconds); simulations/bench_fuzz.py runs ≥ 10,000


@pytest.fixture(autouse=True)
def _quiet_flower() -> None:
    """Thousands of rejections are logged by design; the suite does not need to format them."""
    logger = logging.getLogger("flwr")
    level, logger.level = logger.level, logging.CRITICAL
    yield
    logger.setLevel(level)


@settings(max_examples=SUITE_CASES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(cases())
def test_crafted_replies_leave_the_model_the_aggregate_of_the_honest_ones(case: Case) -> None:
    check_case(case)  # Prepare (drawn), Execute (two aggregations), Assert (equal arrays and dtypes, no exception)
