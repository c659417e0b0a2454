"""Runs NVIDIA FLARE's POC mode (server + clients as local processes) on a tiny PyTorch FedAvg job; prints its timing as JSON.

Run with the Python of a virtual environment that has NVFlare 2.9 (never histofed's):
    /work/nvflare-venv/bin/python simulations/nvflare_job/driver.py --rounds 3 --sites 3 --out result.json
Loopback only: the POC project is written with free local ports; the workspace is a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _project(folder: Path, sites: int) -> Path:
    """The default POC project for `sites` clients, on free loopback ports."""
    from nvflare.lighter.provision import gen_default_project_config
    from nvflare.lighter.utils import load_yaml
    from nvflare.tool.poc import poc_commands as poc

    base = folder / "base.yml"
    gen_default_project_config("dummy_project.yml", str(base))
    config = poc.update_clients([], sites, poc.update_server_name(load_yaml(str(base))))
    for participant in config["participants"]:
        if participant["type"] == "server":
            participant["fed_learn_port"] = _free_port()
            participant["admin_port"] = _free_port()
    path = folder / "project.yml"
    poc.save_project_config(config, str(path))
    return path


def _rounds(log: Path) -> dict[str, float]:
    """Per-round wall time (between the sites' receipts of consecutive models), slowest compute, overhead."""
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    by_round: dict[int, list[dict]] = {}
    for r in records:
        by_round.setdefault(int(r["round"]), []).append(r)
    rounds = sorted(by_round)
    if len(rounds) < 2:
        return {"error": f"only {len(rounds)} round(s) logged"}
    starts = [min(r["received"] for r in by_round[k]) for k in rounds]
    period = (starts[-1] - starts[0]) / (len(rounds) - 1)  # the first round's start-up excluded
    compute = sum(max(r["computed"] - r["received"] for r in by_round[k]) for k in rounds[:-1]) / (len(rounds) - 1)
    return {"s-per-round": round(period, 2), "slowest-site-compute-s-per-round": round(compute, 2),
            "overhead-s-per-round": round(period - compute, 2), "messages-per-site-per-round": 1.0}


def main() -> None:
    """Provision, start POC, run the job, stop POC; write the timing JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    import nvflare

    sys.path.insert(0, str(HERE))
    from tinynet import TinyNet

    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.recipe import PocEnv

    with tempfile.TemporaryDirectory(prefix="nvflare-poc-") as tmp:
        folder = Path(tmp)
        os.environ["NVFLARE_POC_WORKSPACE"] = str(folder / "poc")
        log = folder / "rounds.jsonl"
        env = PocEnv(num_clients=args.sites, project_conf_path=str(_project(folder, args.sites)))
        recipe = FedAvgRecipe(name="histofed_peer", model=TinyNet(), min_clients=args.sites, num_rounds=args.rounds,
                              train_script=str(HERE / "client.py"), train_args=f"--log {log}")
        recipe.add_client_file(str(HERE / "tinynet.py"))
        started = time.time()
        try:
            run = recipe.execute(env)
            result = run.get_result(timeout=args.timeout, clean_up=False)
            status = run.get_status()
        finally:
            env.stop(clean_up=True)
        out = {"nvflare": nvflare.__version__, "mode": "POC (local processes)", "data-kind": "synthetic",
               "rounds": args.rounds, "sites": args.sites, "job-status": str(status), "result": bool(result),
               "total-s": round(time.time() - started, 1)}
        out.update(_rounds(log) if log.is_file() else {"error": "no round was logged by the clients"})
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
