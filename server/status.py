"""`flower-server status`: which sites are connected now, the round and phase, the last metrics, time per round, time left.

Connected sites come from Flower's own `flwr supernode list` through the run's private FLWR_HOME
connection (the Control API of the SuperLink `flower-server start` runs); node ids are named by
the sites' replies (the run directory's timing records). Round, phase and times come from the run
directory (RunDirectory: status, metrics log).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from common.rundir import RunDirectory
from server.deploy import CONNECTION, Federation
from server.launch import FlowerRunError, flwr_environment, flwr_executable


@dataclass
class FederationStatus:
    """What `flower-server status` reports."""

    address: str
    state: str  # running / completed / failed / unknown
    sites: list[dict[str, str]] = field(default_factory=list)  # node, site, status (online/offline/registered)
    rounds: int = 0
    completed_round: int | None = None  # the last round with its metrics line
    round: int | None = None  # the round being run now
    phase: str = ""
    phase_for_s: float | None = None
    last_global: dict[str, float] = field(default_factory=dict)
    s_per_round: float | None = None
    left_s: float | None = None


def list_nodes(run: RunDirectory, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """The SuperLink's SuperNodes (Flower's `flwr supernode list --format json`); FlowerRunError when it does not answer."""
    if not (run.flwr_home / "config.toml").is_file():
        raise FlowerRunError(f"no federation was started from {run.path} (no Flower connection there)")
    try:
        done = subprocess.run([flwr_executable(), "supernode", "list", CONNECTION, "--format", "json"],
                              capture_output=True, text=True, env=flwr_environment(run.flwr_home), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise FlowerRunError(f"the SuperLink did not answer within {timeout_s:g} s") from None
    start = done.stdout.find("{")
    try:
        answer = json.loads(done.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        answer = {}
    if done.returncode != 0 or not answer.get("success"):
        said = [ln.strip() for ln in str(answer.get("error-message", "")).splitlines() if ln.strip()]
        raise FlowerRunError(said[-1] if said else "the SuperLink does not answer")  # its last line is the cause
    return list(answer.get("nodes", []))


def federation_status(fed: Federation) -> FederationStatus:
    """Ask the running SuperLink and read the run directory; FlowerRunError when no server is running."""
    run = RunDirectory(fed.server.run_dir)
    address = fed.server.address or f"127.0.0.1:{fed.server.port}"
    try:
        nodes = list_nodes(run)
    except FlowerRunError as err:
        raise FlowerRunError(f"no federation server answers at {address} ({err}); start it with `flower-server start`") from None
    names = {str(r["node"]): r["site"] for r in run.timing() if r.get("site")}
    status = run.read_status()
    history = run.history()
    out = FederationStatus(address=address, state=str(status.get("status", "unknown")), rounds=fed.run.federation.rounds)
    out.sites = [{"node": str(n["node-id"]), "site": names.get(str(n["node-id"]), "?"), "status": str(n["status"])}
                 for n in nodes if n.get("status") != "unregistered"]
    if history:
        out.completed_round, out.last_global = int(history[-1]["round"]), dict(history[-1].get("global", {}))
    if "round" in status:
        out.round, out.phase = int(status["round"]), str(status.get("phase", ""))
        since = status.get("phase-since")
        out.phase_for_s = round(time.time() - float(since), 1) if since else None
    durations = [b["elapsed-s"] - a["elapsed-s"] for a, b in zip(history, history[1:]) if a["round"] >= 0]
    if durations:
        out.s_per_round = round(statistics.median(durations[-5:]), 1)
        done = out.completed_round or 0
        out.left_s = round(out.s_per_round * max(out.rounds - done, 0), 0)
    return out


def status_lines(status: FederationStatus) -> list[str]:
    """The report, one fact a line."""
    online = [s for s in status.sites if s["status"] == "online"]
    lines = [f"server {status.address}: run {status.state}",
             f"sites connected now: {len(online)} of {len(status.sites)} known"]
    lines += [f"  {s['site']} (node {s['node']}): {s['status']}" for s in status.sites]
    if status.round is not None:
        since = f" for {status.phase_for_s:g} s" if status.phase_for_s is not None else ""
        lines.append(f"round {status.round}/{status.rounds}: {status.phase or '?'}{since}")
    if status.completed_round is not None:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in status.last_global.items() if k in ("accuracy", "auc", "f1", "loss"))
        lines.append(f"last metrics (round {status.completed_round}): {shown or '—'}")
    if status.s_per_round is not None:
        lines.append(f"time per round: {status.s_per_round:g} s; estimated time left: {status.left_s:g} s")
    return lines
