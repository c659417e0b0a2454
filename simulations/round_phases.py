"""Where a federated round's time goes: per-message phases and per-round overhead from a run's timing records.

The records are the run directory's `timing.jsonl` (server/exchange.py): per reply, when the
server sent the batch and pulled the reply, and the stamps the site added (client/timing.py). A
*batch* is one (round, phase) send: a round is two batches (train, evaluate), or one with
federation.evaluate-with-train. The first batch (it closes round 0 and pays start-up) is left out.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

# (label, stamp it starts at, stamp it ends at); "sent"/"received" are the server's, the rest the site's
PHASES: tuple[tuple[str, str, str], ...] = (
    ("server sent -> ClientApp process up (SuperNode's 3 s poll, download, SuperExec poll, spawn)", "sent",
     "process-start"),
    ("process up -> app loaded (Flower start, FAB, client.entry)", "process-start", "app-loaded"),
    ("app loaded -> histofed handler", "app-loaded", "handler"),
    ("imports (in process: torch, timm; warm: hand-over)", "handler", "imports"),
    ("data and model ready", "imports", "ready"),
    ("compute (train / evaluate)", "ready", "computed"),
    ("reply built (and sent back by the worker)", "computed", "replied"),
    ("reply -> ServerApp received (SuperNode push, poll)", "replied", "received"),
)


def _stamps(record: dict[str, Any]) -> dict[str, float]:
    out = {k: float(v) for k, v in record.get("client", {}).items() if isinstance(v, (int, float))}
    out.update(sent=float(record["sent"]), received=float(record["received"]))
    return out


def batches(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The successful replies grouped by (round, phase) send, in the order they were sent."""
    grouped: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if "error" not in record and record.get("received"):
            grouped[(record["round"], record["phase"])].append(record)
    return sorted(grouped.values(), key=lambda batch: batch[0]["sent"])


def compute_seconds(record: dict[str, Any]) -> float:
    """The site's compute for one message (ready → computed)."""
    s = _stamps(record)
    return s["computed"] - s["ready"] if "computed" in s and "ready" in s else 0.0


def phase_table(records: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """Median seconds of each phase over the messages after the first batch (phases a path lacks are left out)."""
    steady = [r for batch in batches(records)[1:] for r in batch]
    rows = []
    for label, start, end in PHASES:
        values = [s[end] - s[start] for s in map(_stamps, steady) if start in s and end in s]
        if values:
            rows.append((label, round(statistics.median(values), 3)))
    totals = [r["received"] - r["sent"] for r in steady]
    if totals:
        rows.append(("total per message (sent -> received)", round(statistics.median(totals), 3)))
    return rows


def round_overhead(records: list[dict[str, Any]], rounds: int) -> dict[str, float]:
    """Per-round wall time after the first batch, the slowest site's compute per round, and their difference."""
    sent = batches(records)
    if len(sent) < 2 or rounds < 1:
        return {}
    start = max(r["received"] for r in sent[0])
    end = max(r["received"] for r in sent[-1])
    compute = sum(max(compute_seconds(r) for r in batch) for batch in sent[1:])
    per_round = (end - start) / rounds
    return {"s-per-round": round(per_round, 2), "slowest-site-compute-s-per-round": round(compute / rounds, 2),
            "overhead-s-per-round": round(per_round - compute / rounds, 2),
            "messages-per-site-per-round": round((len(sent) - 1) / rounds, 2)}


def start_to_ready(records: list[dict[str, Any]], path: str = "warm") -> float | None:
    """Median seconds from the ClientApp process's start to data and model ready, over messages on `path`."""
    values = [s["ready"] - s["process-start"] for r in records if r.get("client", {}).get("path") == path
              for s in [_stamps(r)] if "ready" in s and "process-start" in s]
    return round(statistics.median(values), 3) if values else None
