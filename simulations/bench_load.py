"""Benchmark (load): a simulation of many sites × many rounds at tiny size completes; memory per site (Ray workers' RSS/USS).

Usage: python -m simulations.bench_load [--sites 20] [--rounds 20] [--out load.json]
Runs `flower-sim run synthetic-tiny` as a subprocess (simulations/bench_federation.federated samples the
RSS of every Flower/Ray process twice a second; USS for Ray's ClientApp workers: what one more site costs).
SYNTHETIC data. Checks that every round was recorded with every site and that no site failed or was rejected.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from simulations.bench_federation import federated
from simulations.figures import emit
from common.rundir import RunDirectory

SCENARIO = "synthetic-tiny"


def load(sites: int, rounds: int, run_dir: Path) -> dict:
    """One run of `sites` × `rounds`: completion, per-round checks, memory and time figures."""
    overrides = {"federation.num-sites": sites, "federation.rounds": rounds, "federation.min-train-sites": sites,
                 "federation.min-evaluate-sites": sites, "federation.min-available-sites": sites}
    start = time.perf_counter()
    measured = federated(overrides, run_dir, scenario=SCENARIO, timeout_s=3600.0, start_timeout_s=600.0)
    wall = time.perf_counter() - start
    if measured["attempts"] > 1:  # a Flower start-up hang: bench_federation started it once more, elsewhere
        run_dir = run_dir.with_name(f"{run_dir.name}-retry")
    history = RunDirectory(run_dir).history()
    status = RunDirectory(run_dir).read_status()
    per_round = [len(r.get("sites", {})) for r in history]
    troubled = [r["round"] for r in history if r.get("failed") or r.get("rejected")]
    workers = measured["ray-client-workers"] or 1
    return {
        "sites": sites, "rounds": rounds, "scenario": SCENARIO, "data-kind": measured["data-kind"],
        "completed": status.get("status") == "completed" and len(history) == rounds + 1,
        "rounds recorded (incl. round 0)": len(history),
        "fewest sites evaluated in a round": min(per_round) if per_round else 0,
        "rounds with failed/rejected sites": troubled,
        "wall-s": round(wall, 1), "serverapp-s": measured["serverapp-s"],
        "s per round (serverapp, after round 0)": round((float(measured["serverapp-s"]) -
                                                         float(history[0]["elapsed-s"])) / rounds, 2) if history else None,
        "ray client workers": measured["ray-client-workers"],
        "peak rss-mib per worker (largest)": measured["peak-rss-mib (largest ray client worker)"],
        "peak rss-mib per worker (mean)": measured["mean-rss-mib (ray client workers)"],
        "peak uss-mib per worker (mean): one more site": measured["mean-uss-mib (ray client workers)"],
        "peak rss-mib all flower+ray processes": measured["peak-rss-mib (all flower+ray processes)"],
        "peak rss-mib all processes / site": round(measured["peak-rss-mib (all flower+ray processes)"] / sites, 1),
        "sites per worker": round(sites / workers, 2),
        "accuracy (synthetic)": measured["accuracy"],
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the load benchmark once and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directory here")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="histofed-load-"))
    try:
        result = load(args.sites, args.rounds, (args.keep or tmp) / "run")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return emit(result.items(), result, args.out)


if __name__ == "__main__":
    main()
