"""The benchmark's breakdown of a round: phases per message and overhead per round from timing records."""

from __future__ import annotations

import pytest

from simulations.round_phases import phase_table, round_overhead, start_to_ready


def _reply(server_round: int, phase: str, sent: float, site: str, compute: float, path: str = "warm") -> dict:
    start = sent + 1.0
    client = {"process-start": start, "app-loaded": start + 1.0, "handler": start + 1.0, "imports": start + 1.1,
              "ready": start + 1.2, "computed": start + 1.2 + compute, "replied": start + 1.3 + compute, "path": path}
    return {"round": server_round, "phase": phase, "site": site, "sent": sent,
            "received": client["replied"] + 0.5, "client": client}


def test_overhead_is_round_time_minus_the_slowest_sites_compute() -> None:
    records = [_reply(1, "train", 0.0, "a", 0.1), _reply(1, "train", 0.0, "b", 0.1)]  # start-up batch: left out
    for r, t0 in ((2, 3.0), (3, 8.9)):  # one message per site and round, each sent 0.1 s after the last reply
        records += [_reply(r, "train", t0, "a", 1.0), _reply(r, "train", t0, "b", 3.0)]
    records.append({"round": 3, "phase": "evaluate", "site": "a", "sent": 30.0, "error": "Node unavailable"})
    got = round_overhead(records, rounds=2)  # the slowest reply of a batch: 5.8 s after it was sent, + 0.1 s gap
    assert got["s-per-round"] == pytest.approx(5.9) and got["slowest-site-compute-s-per-round"] == pytest.approx(3.0)
    assert got["overhead-s-per-round"] == pytest.approx(2.9) and got["messages-per-site-per-round"] == 1.0
    table = dict(phase_table(records))
    assert table["compute (train / evaluate)"] == pytest.approx(2.0)  # median over the steady messages
    assert table["total per message (sent -> received)"] == pytest.approx(4.8, abs=1e-6)
    assert start_to_ready(records) == pytest.approx(1.2) and start_to_ready(records, "in-process") is None
