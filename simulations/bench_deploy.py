"""Benchmark: per-round wall time of deployment (SuperLink + SuperNodes) vs simulation for the same work.

Usage: python -m simulations.bench_deploy [--rounds 3] [--out FILE.json]
Both run the `synthetic-tiny` model and data with 2 sites on this machine (deployment over loopback,
--insecure). It also times what every per-message ClientApp process pays before any training in
deployment (Flower starts a fresh `flwr-clientapp` process per message): importing histofed's
ClientApp and building the model. Results are on SYNTHETIC data.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

from common.ports import free_port
from common.rundir import RunDirectory
from simulations.scenarios import get_scenario
from simulations.figures import emit

BIN = Path(sys.executable).parent


def per_round(run_dir: Path) -> float:
    """Mean wall seconds between consecutive rounds in the run's metrics log (round 0 excluded)."""
    stamps = [line["elapsed-s"] for line in RunDirectory(run_dir).history()]
    return (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)


def simulation(tmp: Path, rounds: int) -> float:
    """Per-round wall time through `flower-sim run`."""
    run = tmp / "sim"
    subprocess.run([str(BIN / "flower-sim"), "run", "synthetic-tiny", "--rounds", str(rounds), "--run-dir", str(run)],
                   check=True, capture_output=True, timeout=1800)
    return per_round(run)


def deployment(tmp: Path, rounds: int) -> float:
    """Per-round wall time through `flower-server start` + 2 x `flower-client start` on loopback."""
    port = free_port()
    nested: dict[str, dict] = {}
    for key, value in get_scenario("synthetic-tiny").overrides.items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    nested["federation"].update({"rounds": rounds, "num-sites": 2, "min-available-sites": 2})
    nested.setdefault("train", {})["num-threads"] = 1
    config = tmp / "federation.toml"
    config.write_text(tomli_w.dumps({"server": {"host": "127.0.0.1", "port": port, "run-dir": "deploy"}, "run": nested}))
    server = subprocess.Popen([str(BIN / "flower-server"), "start", "--config", str(config), "--insecure"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clients = [subprocess.Popen([str(BIN / "flower-client"), "start", "--site", f"synthetic-hospital-{i}",
                                 "--server", f"127.0.0.1:{port}", "--insecure", "--log-file", str(tmp / f"c{i}.log")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    try:
        server.wait(timeout=3600)
    finally:
        for c in clients:
            c.terminate()
            c.wait(timeout=30)
    if server.returncode != 0:
        raise RuntimeError(f"deployment run failed (exit {server.returncode})")
    return per_round(tmp / "deploy")


def per_message_cost() -> dict[str, float]:
    """Seconds a fresh ClientApp process spends importing histofed's ClientApp, and building the model."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import client.app"], check=True, cwd=Path(__file__).resolve().parents[1])
    imports = time.perf_counter() - start
    code = ("import time; from common.config import RunConfig; from common.model import build_model; "
            "t = time.perf_counter(); build_model(RunConfig().model); print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    return {"clientapp-import-s": round(imports, 2), "model-build-s (default hybrid)": round(float(out.stdout), 2)}


def main(argv: list[str] | None = None) -> dict:
    """Run both and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sim = simulation(Path(tmp), args.rounds)
        dep = deployment(Path(tmp), args.rounds)
    result = {"data-kind": "synthetic", "rounds": args.rounds, "simulation-s-per-round": round(sim, 1),
              "deployment-s-per-round": round(dep, 1), "deployment / simulation": round(dep / sim, 2),
              **per_message_cost()}
    return emit(result.items(), result, args.out)


if __name__ == "__main__":
    main()
