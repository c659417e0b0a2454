"""The collapse benchmark's bookkeeping: majority share from pooled counts, curves from metrics.jsonl records."""

from __future__ import annotations

import pytest

from simulations.bench_collapse import CANDIDATES, collapsed_rounds, curves, majority_share, table


def test_majority_share_counts_predicted_columns() -> None:
    assert majority_share([[90, 0], [8, 2]]) == pytest.approx(0.98)  # 98 of 100 called class 0
    assert majority_share([[40, 10], [10, 40]]) == pytest.approx(0.5)


def test_curves_flag_collapsed_rounds_and_read_personalised_results() -> None:
    def record(r: int, cm: list[list[int]]) -> dict:
        return {"round": r, "global": {"accuracy": 0.5, "auc": 0.7}, "confusion": cm,
                "personalised": {"global": {"accuracy": 0.9, "auc": 0.95}, "confusion": [[45, 5], [5, 45]]}}

    history = [record(0, [[99, 1], [0, 0]]), record(1, [[50, 0], [48, 2]]), record(2, [[40, 10], [10, 40]])]
    glob, pers = curves(history), curves(history, "personalised")
    assert collapsed_rounds(glob) == [1]  # round 0 does not count: the untrained model
    assert collapsed_rounds(pers) == [] and pers[0]["accuracy"] == 0.9
    text = table({"fedavg": glob, "fedbn (personalised)": pers})
    assert "0.500 / 0.700 / 0.980" in text and len(text.splitlines()) == 2 + 3


def test_every_candidate_is_a_valid_configuration() -> None:
    from common.config import RunConfig

    for name, overrides in CANDIDATES.items():
        RunConfig().override(overrides)  # raises ConfigError naming the key if a candidate is invalid
