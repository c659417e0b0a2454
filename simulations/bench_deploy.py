"""Benchmark: where a deployment round goes (per phase), per-round overhead before/after histofed's speed-ups, vs simulation and NVFlare.

Usage: python -m simulations.bench_deploy [--rounds 3] [--sites 3] [--variants before,after] [--no-nvflare] [--out FILE.json]

Every variant runs the `synthetic-tiny` model and data (SYNTHETIC) with the same sites on this
machine: deployment is `flower-server start --insecure` + one `flower-client start --insecure` per
site over loopback; simulation is `flower-sim run`; the peer is NVIDIA FLARE's POC mode
(simulations/bench_nvflare.py, in its own virtual environment; left out with a note when absent).
Deployment variants:
- before: what histofed did until now: Flower's 3 s reply polling, SuperExec polling 1 s, one Flower
  object per tensor on the wire, no warm worker (every message imports torch and timm), train and
  evaluate messages each round;
- no-warm: replies polled every 0.2 s, SuperExec 0.1 s, the model packed on the wire (common/wire.py)
  and federation.evaluate-with-train (one message per site and round, same metrics), no worker;
- after: the same with the warm site worker.
Overhead per round = wall time per round minus the slowest site's compute in it (after the first
batch of messages, which pays start-up). The phase table lays out one message from the stamps the
server and the sites log (client/timing.py, server/exchange.py), medians over the messages.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.ports import free_port
from common.rundir import RunDirectory
from simulations.figures import emit
from simulations.round_phases import phase_table, round_overhead, start_to_ready
from simulations.scenarios import get_scenario

BIN = Path(sys.executable).parent
SCENARIO = "synthetic-tiny"


@dataclass(frozen=True)
class Variant:
    """One way of running the same deployment."""

    warm: bool
    task_poll_s: float
    evaluate_with_train: bool
    reply_poll_s: float
    packed: bool


VARIANTS = {
    "before": Variant(warm=False, task_poll_s=1.0, evaluate_with_train=False, reply_poll_s=3.0, packed=False),
    "no-warm": Variant(warm=False, task_poll_s=0.1, evaluate_with_train=True, reply_poll_s=0.2, packed=True),
    "after": Variant(warm=True, task_poll_s=0.1, evaluate_with_train=True, reply_poll_s=0.2, packed=True),
}


def run_config(rounds: int, sites: int, evaluate_with_train: bool) -> dict[str, dict[str, Any]]:
    """The scenario's nested run config for `sites` sites and `rounds` rounds."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in get_scenario(SCENARIO).overrides.items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    nested["federation"].update({"rounds": rounds, "num-sites": sites, "min-available-sites": sites,
                                 "min-train-sites": sites, "min-evaluate-sites": sites,
                                 "evaluate-with-train": evaluate_with_train})
    nested.setdefault("train", {})["num-threads"] = 1
    return nested


def deployment(tmp: Path, rounds: int, sites: int, variant: Variant) -> RunDirectory:
    """One `flower-server start` + `sites` x `flower-client start` on loopback; returns the run directory."""
    port = free_port()
    config = tmp / "federation.toml"
    run = {"server": {"host": "127.0.0.1", "port": port, "run-dir": "deploy"},
           "run": run_config(rounds, sites, variant.evaluate_with_train)}
    config.write_text(tomli_w.dumps(run))
    env = {**os.environ, "HISTOFED_REPLY_POLL_S": f"{variant.reply_poll_s:g}",
           "HISTOFED_WIRE_PACK": "1" if variant.packed else "0"}
    server = subprocess.Popen([str(BIN / "flower-server"), "start", "--config", str(config), "--insecure"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    warm = "--warm" if variant.warm else "--no-warm"
    clients = [subprocess.Popen([str(BIN / "flower-client"), "start", "--site", f"synthetic-hospital-{i}",
                                 "--server", f"127.0.0.1:{port}", "--insecure", warm,
                                 "--task-poll-interval", f"{variant.task_poll_s:g}",
                                 "--log-file", str(tmp / f"site-{i}.log")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) for i in range(sites)]
    try:
        server.wait(timeout=3600)
    finally:
        for c in clients:
            c.terminate()
        for c in clients:
            c.wait(timeout=60)
    if server.returncode != 0:
        raise RuntimeError(f"deployment run failed (exit {server.returncode}; logs in {tmp})")
    return RunDirectory(tmp / "deploy")


def simulation(tmp: Path, rounds: int, sites: int) -> float:
    """Per-round wall time through `flower-sim run` (round 0 excluded)."""
    run = tmp / "sim"
    subprocess.run([str(BIN / "flower-sim"), "run", SCENARIO, "--rounds", str(rounds), "--sites", str(sites),
                    "--run-dir", str(run), "--no-report"], check=True, capture_output=True, timeout=1800)
    stamps = [line["elapsed-s"] for line in RunDirectory(run).history()]
    return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)


def prerender(cache: Path, sites: int) -> None:
    """Render the synthetic sites into the shared disk cache once, so every variant starts from the same cache."""
    from common.datasets.registry import get_dataset
    from simulations.scenarios import get_scenario as scenario

    cfg = scenario(SCENARIO).config().with_sites(sites).override({"data.cache-dir": str(cache)})
    for site in range(sites):
        for split in ("train", "test"):
            get_dataset("synthetic").load_split(cfg, site, split)


def measure(name: str, tmp: Path, rounds: int, sites: int) -> dict[str, Any]:
    """Run one deployment variant; its overhead, phases and warm start-to-ready."""
    (tmp / name).mkdir()
    run = deployment(tmp / name, rounds, sites, VARIANTS[name])
    records = run.timing()
    history = run.history()
    return {"overhead": round_overhead(records, rounds), "phases": phase_table(records),
            "warm-start-to-ready-s": start_to_ready(records, "warm"),
            "in-process-start-to-ready-s": start_to_ready(records, "in-process"),
            "rounds-logged": [line["round"] for line in history],
            "final-global": history[-1]["global"] if history else {}}


def _nvflare(rounds: int, sites: int) -> dict[str, Any]:
    from simulations.bench_nvflare import measure_poc

    return measure_poc(rounds=rounds, sites=sites)


def main(argv: list[str] | None = None) -> dict:
    """Run the variants, the simulation and the peer; print the tables; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--variants", default="before,no-warm,after")
    parser.add_argument("--nvflare", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]} (choose from {', '.join(VARIANTS)})")
    result: dict[str, Any] = {"data-kind": "synthetic", "scenario": SCENARIO, "sites": args.sites,
                              "rounds": args.rounds, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ["HISTOFED_CACHE"] = str(tmp / "cache")
        prerender(tmp / "cache", args.sites)
        result["simulation-s-per-round"] = round(simulation(tmp, args.rounds, args.sites), 2)
        for name in names:
            result[name] = measure(name, tmp, args.rounds, args.sites)
    result["nvflare"] = _nvflare(args.rounds, args.sites) if args.nvflare else {"skipped": "--no-nvflare"}
    return emit(_rows(result, names), result, args.out)


def _rows(result: dict[str, Any], names: list[str]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [("data", f"SYNTHETIC ({result['scenario']}, {result['sites']} sites, "
                                           f"{result['rounds']} rounds, loopback, {result['cpus']} CPUs)"),
                                   ("simulation s/round", result["simulation-s-per-round"])]
    for name in names:
        r = result[name]
        rows += [(f"[{name}] {k}", v) for k, v in r["overhead"].items()]
        rows += [(f"[{name}] start-to-ready warm / in-process s",
                  f"{r['warm-start-to-ready-s']} / {r['in-process-start-to-ready-s']}")]
        rows += [(f"[{name}]   {label}", v) for label, v in r["phases"]]
    nv = result["nvflare"]
    rows += [(f"[nvflare] {k}", v) for k, v in nv.items()]
    after = result.get("after", {}).get("overhead", {}).get("s-per-round")
    if after:
        rows.append(("after / simulation (s per round)", round(after / result["simulation-s-per-round"], 1)))
        if nv.get("s-per-round"):
            rows.append(("after / NVFlare POC (s per round)", round(after / nv["s-per-round"], 2)))
        before = result.get("before", {}).get("overhead", {}).get("s-per-round")
        if before:
            rows.append(("before / after (s per round)", round(before / after, 1)))
    return rows


if __name__ == "__main__":
    main()
