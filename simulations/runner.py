"""Run the Flower app through Flower's simulation engine (`flwr run` on a local simulation connection) and clean up."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from common.config import RunConfig

CONNECTION = "histofed-sim"
LOG_FILE = "flower.log"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"


class SimulationError(RuntimeError):
    """The simulation could not start or did not complete."""


@dataclass(frozen=True)
class SimulationPlan:
    """Everything one `flwr run` needs: validated config, where to write, resources per site."""

    cfg: RunConfig
    run_dir: Path
    app_dir: Path
    cpus_per_site: int = 1
    ray_cpus: int = 1
    gpus_per_site: float = 0.0
    timeout_s: float = 3600.0


def find_app_dir() -> Path:
    """The project folder whose pyproject.toml declares the Flower app."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise SimulationError(
            f"cannot find the histofed Flower app (pyproject.toml) above {Path(__file__).parent}; "
            "run from a histofed checkout installed with `pip install -e .`"
        )
    return root


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """Rounds written so far to metrics.jsonl (a partial last line is ignored)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def read_status(run_dir: Path) -> dict[str, Any]:
    """The ServerApp's status marker, or {} if it never wrote one."""
    try:
        return json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_simulation(plan: SimulationPlan, on_poll: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Submit the run, wait for it, stop every Flower process started; return the final status."""
    run_dir, flwr_home = plan.run_dir, plan.run_dir / ".flwr"
    _write_connection(flwr_home)
    config_path = run_dir / "run-config.toml"
    config_path.write_text(tomli_w.dumps(_nested(plan.cfg.to_flat())))
    env = _environment(flwr_home)
    cmd = [
        _flwr_executable(), "run", str(plan.app_dir), CONNECTION, "--stream",
        "--run-config", str(config_path),
        "--federation-config",
        f"num-supernodes={len(plan.cfg.federation.training_sites)} "
        f"client-resources-num-cpus={plan.cpus_per_site} init-args-num-cpus={plan.ray_cpus} "
        f"client-resources-num-gpus={plan.gpus_per_site:g}",
    ]
    deadline = time.monotonic() + plan.timeout_s
    with (run_dir / LOG_FILE).open("ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=run_dir, start_new_session=True,
        )
        try:
            while proc.poll() is None:
                on_poll()
                if time.monotonic() > deadline:
                    raise SimulationError(f"simulation exceeded its {plan.timeout_s:g} s timeout")
                time.sleep(0.5)
            status = _await_status(run_dir, grace_s=15.0 if proc.returncode == 0 else 0.0, on_poll=on_poll)
        finally:
            _stop_processes(proc, flwr_home)
    on_poll()
    if not status:
        status = {"status": "failed", "error": _last_error(run_dir / LOG_FILE)}
    return status


def _write_connection(flwr_home: Path) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: {"address": ":local:"}}})
    )


def _nested(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return nested


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environment(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # offline: no `uv sync` (code 608)
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
        PYTHONUNBUFFERED="1",
    )
    return env


def _flwr_executable() -> str:
    local = Path(sys.executable).parent / "flwr"
    found = str(local) if local.is_file() else shutil.which("flwr")
    if not found:
        raise SimulationError("the `flwr` command is not installed (pip install 'flwr[simulation]')")
    return found


def _await_status(run_dir: Path, *, grace_s: float, on_poll: Callable[[], None]) -> dict[str, Any]:
    deadline = time.monotonic() + grace_s
    while True:
        status = read_status(run_dir)
        if status.get("status") in ("completed", "failed") or time.monotonic() > deadline:
            return status if status.get("status") != "running" else {}
        on_poll()
        time.sleep(0.5)


def _stop_processes(proc: subprocess.Popen, flwr_home: Path) -> None:
    """Stop `flwr run` and the detached local SuperLink (found by its FLWR_HOME log path), with children."""
    marker = str(flwr_home)
    roots = [psutil.Process(proc.pid)] if proc.poll() is None else []
    for candidate in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in candidate.info["cmdline"] or []):
                roots.append(candidate)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    victims: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            for p in [root, *root.children(recursive=True)]:
                victims[p.pid] = p
        except psutil.NoSuchProcess:
            continue
    for p in victims.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(victims.values()), timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=10)


def _last_error(log_path: Path) -> str:
    """The most telling error line of a Flower log (rich error boxes unwrapped into one line)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "the run ended without a status (no Flower log)"
    box: list[str] = []
    for line in lines:
        if line.startswith("╭─ Error"):
            box = []
        elif line.startswith("│"):
            box.append(line.strip("│ "))
    if box:
        return " ".join(box)
    for line in reversed(lines):
        if any(word in line for word in ("Error", "Exception", "failed", "Failed")):
            return line.strip()[-300:]
    return f"the run ended without a status; see {log_path}"
