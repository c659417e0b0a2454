"""Benchmark: ≥ 10,000 crafted train replies (hypothesis) mixed with honest ones through the strategy's aggregate_train.

Usage: python -m simulations.bench_fuzz [--cases 10000] [--seed 1] [--out fuzz.json]
The property (simulations/fuzz_replies.py): no round crashes, and the global model equals the aggregate
of the honest replies alone (so it stays in their convex hull). Prints cases/s, the defects drawn, the result.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings

from simulations.figures import emit
from simulations.fuzz_replies import Case, cases, check_case


def run(n: int, random_seed: int) -> dict:
    """Check n drawn cases; count them, their crafted replies and defect kinds; the first failure, if any."""
    counts: Counter[str] = Counter()
    seen = {"cases": 0, "crafted": 0, "failed-replies": 0, "honest": 0}

    @seed(random_seed)
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(cases())
    def property_holds(case: Case) -> None:
        seen["cases"] += 1
        seen["honest"] += len(case.honest)
        seen["crafted"] += sum("error" not in c for c in case.crafted)
        seen["failed-replies"] += sum("error" in c for c in case.crafted)
        counts.update(d.split()[0] for d in case.defects)
        check_case(case)

    logger = logging.getLogger("flwr")
    level, logger.level = logger.level, logging.CRITICAL  # every rejection is logged by design: not timed here
    start, failure = time.perf_counter(), ""
    try:
        property_holds()
    except AssertionError as err:  # hypothesis re-raises the (shrunk) failing case
        failure = str(err)[:2000]
    finally:
        logger.setLevel(level)
    seconds = time.perf_counter() - start
    return {"cases": seen["cases"], "seconds": round(seconds, 1), "cases-per-s": round(seen["cases"] / seconds, 1),
            "honest replies": seen["honest"], "crafted replies": seen["crafted"],
            "error replies (failed sites)": seen["failed-replies"], "defects drawn": dict(counts.most_common()),
            "property held": not failure, "first failure": failure, "seed": random_seed}


def main(argv: list[str] | None = None) -> dict:
    """Run the fuzz benchmark and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.cases, args.seed)
    rows = [(k, v) for k, v in result.items() if k not in ("defects drawn", "first failure")]
    rows += [(f"defect: {k}", v) for k, v in result["defects drawn"].items()]
    if result["first failure"]:
        rows.append(("first failure", result["first failure"].splitlines()[0]))
    return emit(rows, result, args.out)


if __name__ == "__main__":
    main()
