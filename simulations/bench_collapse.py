"""Collapse benchmark: candidate federation settings through `flower-sim run`, per-round global accuracy, AUC and majority share.

The "collapse" (issue 13): after round 1 the averaged model gives one class to (nearly) every test patch.
Each candidate is one real `flower-sim run` (SuperLink, Ray, ServerApp, ClientApps) of the same scenario
with a few `--set` overrides; from its metrics.jsonl this prints, round by round and side by side, the
global model's pooled accuracy, AUC, and the share of the pooled test set given the majority predicted
class (>= 95 % at a round >= 1 counts as collapse). With FedBN the sites' personalised models are shown
too ("fedbn (personalised)"). Run it under the heavy-job lock:

    flock /tmp/histofed-heavy.lock python -m simulations.bench_collapse --tiny --out collapse.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.rundir import RunDirectory

FLOWER_SIM = str(Path(sys.executable).parent / "flower-sim")
COLLAPSE_SHARE = 0.95  # issue 13: no round >= 1 may give one class to >= 95 % of the pooled test set
SGD = {"train.optimizer": "sgd", "train.lr": 0.05}

# name → flat config overrides on top of the scenario (the levers of issue 13, not a recommendation)
CANDIDATES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedbn": {"federation.local-norm": True},
    "groupnorm": {"model.norm": "group"},
    "sgd-momentum": {**SGD, "train.momentum": 0.9},
    "fedadam": {"federation.strategy": "fedadam"},
    "fedprox": {"federation.strategy": "fedprox", "federation.proximal-mu": 0.01},
    "scaffold": {**SGD, "train.momentum": 0.0, "federation.strategy": "scaffold"},
    "stain-augment": {"data.stain-augment": 0.5},
}
TINY = {"scenario": "synthetic-tiny", "rounds": 2, "candidates": ("fedavg", "fedbn", "groupnorm", "scaffold")}


def majority_share(confusion: list[list[int]] | np.ndarray) -> float:
    """Share of the test set given the most often predicted class (columns of the confusion matrix)."""
    cm = np.asarray(confusion, dtype=np.int64)
    total = int(cm.sum())
    return float(cm.sum(axis=0).max() / total) if total else float("nan")


def curves(history: list[dict[str, Any]], part: str = "") -> list[dict[str, Any]]:
    """Per round: accuracy, AUC and majority share of the global model (or of part='personalised')."""
    out = []
    for record in history:
        scope = record.get(part) if part else record
        if not scope:
            continue
        out.append({"round": record["round"], "accuracy": scope["global"].get("accuracy"),
                    "auc": scope["global"].get("auc"), "majority-share": majority_share(scope["confusion"])})
    return out


def collapsed_rounds(curve: list[dict[str, Any]]) -> list[int]:
    """Rounds >= 1 at which one class took >= COLLAPSE_SHARE of the pooled test set."""
    return [c["round"] for c in curve if c["round"] >= 1 and c["majority-share"] >= COLLAPSE_SHARE]


def run_candidate(scenario: str, rounds: int, overrides: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """One `flower-sim run`; the rounds it wrote to metrics.jsonl (RuntimeError with the tail of its output if it failed)."""
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]
    proc = subprocess.run([FLOWER_SIM, "run", scenario, "--rounds", str(rounds), "--run-dir", str(run_dir),
                           "--no-report", *sets], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"flower-sim failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-400:]}")
    return RunDirectory(run_dir).history()


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Rounds down, candidates across: 'accuracy / AUC / majority share' per cell."""
    names = list(results)
    rounds = sorted({c["round"] for curve in results.values() for c in curve})
    fmt = lambda v: "  —  " if v is None or v != v else f"{v:.3f}"  # noqa: E731
    width = max(19, *(len(n) for n in names))
    lines = ["round  " + "  ".join(f"{n:>{width}}" for n in names),
             "       " + "  ".join(f"{'acc / AUC / major':>{width}}" for _ in names)]
    for r in rounds:
        cells = []
        for name in names:
            c = next((c for c in results[name] if c["round"] == r), None)
            cells.append(f"{fmt(c['accuracy'])} / {fmt(c['auc'])} / {fmt(c['majority-share'])}" if c else "—")
        lines.append(f"{r:>5}  " + "  ".join(f"{cell:>{width}}" for cell in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the candidates, print the side-by-side table and the collapsed rounds, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="synthetic-3sites", help="flower-sim scenario")
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help=f"comma-separated: {', '.join(CANDIDATES)}")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra override key=value for every candidate")
    parser.add_argument("--tiny", action="store_true", help="smoke size: synthetic-tiny, 2 rounds, 4 candidates")
    parser.add_argument("--work", type=Path, default=None, help="keep the run directories here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="write the curves as JSON")
    args = parser.parse_args(argv)
    scenario, rounds = (TINY["scenario"], TINY["rounds"]) if args.tiny else (args.scenario, args.rounds)
    chosen = list(TINY["candidates"]) if args.tiny else [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidate '{unknown[0]}' (choose from {', '.join(CANDIDATES)})")
    extra = dict(s.split("=", 1) for s in args.sets)
    print(f"collapse benchmark · {scenario} · {rounds} rounds · SYNTHETIC data · candidates: {', '.join(chosen)}")
    results: dict[str, list[dict[str, Any]]] = {}
    wall: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-collapse-") as tmp:
        work = args.work or Path(tmp)
        for name in chosen:
            start = time.perf_counter()
            history = run_candidate(scenario, rounds, {**CANDIDATES[name], **extra}, work / name)
            wall[name] = round(time.perf_counter() - start, 1)
            results[name] = curves(history)
            if any("personalised" in h for h in history):
                results[f"{name} (personalised)"] = curves(history, "personalised")
            print(f"  {name}: {wall[name]} s", flush=True)
    print(table(results))
    collapsed = {name: collapsed_rounds(curve) for name, curve in results.items()}
    print(f"collapse (one class >= {COLLAPSE_SHARE:.0%} of the pooled test set at a round >= 1): "
          + ", ".join(f"{n} {r or 'none'}" for n, r in collapsed.items()))
    result = {"data": "synthetic", "scenario": scenario, "rounds": rounds, "overrides": extra,
              "candidates": {n: CANDIDATES[n] for n in chosen}, "curves": results, "collapsed-rounds": collapsed,
              "wall-s": wall}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
