"""Benchmark (chaos): a TLS deployment on loopback whose hospitals are killed and restarted, and whose server is killed and resumed.

Usage: python -m simulations.bench_chaos [--sites 5] [--rounds 10] [--kill-every 60] [--down 20]
                                         [--server-kill-after 5] [--out chaos.json]
Every `--kill-every` s a random hospital's `flower-client start` (with its SuperNode and ClientApp) is
kill -9'd and started again `--down` s later; once round `--server-kill-after` is recorded, the server
(and its SuperLink) is kill -9'd and `flower-server start --resume` continues the run. Checked at the end:
the run completed; the metrics log holds every round exactly once, in order (nothing lost or duplicated);
the checkpoint is the last round; the final model loads by key; each round trained on at least
min-train-sites sites and named the sites that failed. SYNTHETIC data (each node generates its site).
What is not checked here: that each round's model is byte-for-byte the aggregate of the replies that
arrived — that property of the aggregation is fuzzed in simulations/bench_fuzz.py.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import tomli_w

from common.config import RunConfig
from common.rundir import RunDirectory
from server.keys import make_kit
from simulations.figures import emit

BIN = Path(sys.executable).parent
TINY = {"backbone": "test_efficientnet", "image-size": 32, "token-dim": 8, "hidden-size": 8}


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def _federation(tmp: Path, kit, sites: int, rounds: int, minimum: int) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "port": _port(), "ca-cert": str(kit.ca_cert), "server-cert": str(kit.server_cert),
                   "server-key": str(kit.server_key), "run-dir": "run",
                   "site-keys": [str(pub) for _, pub in kit.site_keys.values()]},
        "run": {"model": TINY, "data": {"dataset": "synthetic", "train-per-site": 32, "test-per-site": 16},
                "train": {"batch-size": 16, "num-threads": 1},
                "federation": {"num-sites": sites, "rounds": rounds, "min-train-sites": minimum,
                               "min-evaluate-sites": minimum, "min-available-sites": 2, "round-timeout-s": 600.0}},
    }
    path = tmp / "federation.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def _server(config: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "flower-server"), "start", "--config", str(config), "--no-report", *extra],
                            stdout=log.open("a"), stderr=subprocess.STDOUT, cwd=config.parent, start_new_session=True)


def _client(tmp: Path, site: str, port: int, key: Path, ca: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "flower-client"), "start", "--site", site, "--server", f"127.0.0.1:{port}", "--root-cert", str(ca),
         "--auth-key", str(key), "--log-file", str(tmp / f"{site}.log")],
        stdout=(tmp / f"{site}.out").open("a"), stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True,
        env={**os.environ, "HISTOFED_CACHE": str(tmp / "cache")})


def chaos(args: argparse.Namespace, tmp: Path) -> dict:
    """Run the federation under chaos; return the events and the end-of-run checks."""
    names = [f"synthetic-hospital-{i}" for i in range(args.sites)]
    kit = make_kit(tmp / "kit", hosts=["localhost", "127.0.0.1"], sites=names)
    config = _federation(tmp, kit, args.sites, args.rounds, args.min_sites)
    port = __import__("tomllib").loads(config.read_text())["server"]["port"]
    run, log = tmp / "run", tmp / "server.out"
    rng = random.Random(args.seed)
    start = time.monotonic()
    server = _server(config, log)
    while "run submitted" not in log.read_text() and time.monotonic() - start < 120:
        time.sleep(0.5)
    clients = {s: _client(tmp, s, port, kit.site_keys[s][0], kit.ca_cert) for s in names}
    down: dict[str, float] = {}
    events: list[dict] = []
    next_kill, resumed, deadline = time.monotonic() + args.kill_every, False, start + args.timeout
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            done = len(RunDirectory(run).history()) - 1  # rounds recorded after round 0
            if server.poll() is not None and resumed:
                break  # the resumed server finished (or failed): checked below
            if not resumed and done >= args.server_kill_after:
                _kill_tree(server)
                events.append({"t": round(now - start), "event": "server killed", "after-round": done})
                server, resumed = _server(config, log, "--resume"), True
                events.append({"t": round(time.monotonic() - start), "event": "server resumed"})
            if now >= next_kill:
                victim = rng.choice([s for s in names if s not in down])
                _kill_tree(clients[victim])
                down[victim] = now + args.down
                events.append({"t": round(now - start), "event": f"killed {victim}", "round-in-progress": done + 1})
                next_kill = now + args.kill_every
            for site, back in list(down.items()):
                if now >= back:
                    clients[site] = _client(tmp, site, port, kit.site_keys[site][0], kit.ca_cert)
                    del down[site]
                    events.append({"t": round(now - start), "event": f"restarted {site}"})
            time.sleep(1.0)
        wall = time.monotonic() - start
        exit_code = server.wait(timeout=60) if server.poll() is not None or resumed else None
    finally:
        for proc in [server, *clients.values()]:
            _kill_tree(proc)
    return {"wall-s": round(wall, 1), "server exit": exit_code, "events": events, **_checks(run, args)}


def _checks(run: Path, args: argparse.Namespace) -> dict:
    """End-of-run invariants: completed, every round once, checkpoint = last round, model loads, sites named."""
    from common.model import build_model
    from common.weights import load_weights

    folder = RunDirectory(run)
    history, status = folder.history(), folder.read_status()
    rounds = [r["round"] for r in history]
    checkpoint = folder.load_checkpoint()[0] if folder.has_checkpoint() else None
    loads = False
    if folder.model_file.is_file():
        cfg = RunConfig.from_flat(folder.read_config()[0])
        load_weights(build_model(cfg.model, load_pretrained=False), folder.load_model())
        loads = True
    trained = {r["round"]: sorted(r.get("train", {})) for r in history if r["round"] > 0}
    return {
        "completed": status.get("status") == "completed",
        "rounds recorded": rounds,
        "every round exactly once, in order": rounds == list(range(args.rounds + 1)),
        "checkpoint round": checkpoint, "final model loads by key": loads,
        "fewest sites trained in a round": min((len(v) for v in trained.values()), default=0),
        "rounds naming failed sites": {r["round"]: sorted(r["failed"]) for r in history if r.get("failed")},
        "rounds naming rejected sites": {r["round"]: sorted(r["rejected"]) for r in history if r.get("rejected")},
        "status sites-failed": sorted(status.get("sites-failed", {})),
        "data-kind": status.get("data-kind"),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the chaos benchmark once and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--kill-every", type=float, default=60.0)
    parser.add_argument("--down", type=float, default=20.0)
    parser.add_argument("--server-kill-after", type=int, default=5, help="kill the server once this round is recorded")
    parser.add_argument("--min-sites", type=int, default=2,
                        help="federation.min-train-sites and min-evaluate-sites: fewer valid replies fail the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--keep", type=Path, default=None, help="keep the work folder (logs, run directory) here")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="histofed-chaos-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        result = chaos(args, tmp)
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = [(k, v) for k, v in result.items() if k != "events"] + [(f"t={e['t']} s", e["event"]) for e in result["events"]]
    return emit(rows, {**result, "settings": vars(args) | {"keep": str(args.keep), "out": str(args.out)}}, args.out)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
