"""Driving Flower's own CLI from histofed: connections, `flwr run` submission, status, and process clean-up.

No Flower app wiring is imported here: these helpers start `flwr` / `flower-superlink` processes and
read the run directory the ServerApp writes, so the simulation and deployment commands share them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from common.config import RunConfig

LOG_FILE = "flower.log"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"


class FlowerRunError(RuntimeError):
    """A Flower run could not start or did not complete."""


def find_app_dir() -> Path:
    """The project folder whose pyproject.toml declares the Flower app."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise FlowerRunError(
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


def mark_interrupted(run_dir: Path) -> None:
    """After Ctrl-C / SIGTERM: status.json says 'interrupted' (a completed run stays completed)."""
    status = read_status(run_dir)
    if not run_dir.is_dir() or status.get("status") == "completed":
        return
    marked = {**status, "status": "interrupted", "interrupted-at": time.time(),
              "note": "stopped by the operator (Ctrl-C / SIGTERM); continue with --resume"}
    tmp = run_dir / f".{STATUS_FILE}.tmp"
    tmp.write_text(json.dumps(marked, indent=2))
    tmp.replace(run_dir / STATUS_FILE)


def write_connection(flwr_home: Path, name: str, connection: Mapping[str, Any]) -> None:
    """A private FLWR_HOME/config.toml with one named SuperLink connection (the user's ~/.flwr untouched)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": name, name: dict(connection)}}))


def write_run_config(cfg: RunConfig, path: Path) -> Path:
    """The flat run config as the nested TOML file `flwr run --run-config` accepts."""
    path.write_text(tomli_w.dumps(_nested(cfg.to_flat())))
    return path


def submit_and_wait(
    cmd: list[str], run_dir: Path, flwr_home: Path, *, timeout_s: float, on_poll: Callable[[], None],
    extra_processes: tuple[subprocess.Popen, ...] = (),
) -> dict[str, Any]:
    """Run `flwr run ... --stream`, wait, stop what it started (and extra_processes); return the status."""
    deadline = time.monotonic() + timeout_s
    (run_dir / STATUS_FILE).unlink(missing_ok=True)  # a resumed run's old "completed" must not end this one
    with (run_dir / LOG_FILE).open("ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=flwr_environment(flwr_home),
            cwd=run_dir, start_new_session=True,
        )
        try:
            while proc.poll() is None:
                on_poll()
                if read_status(run_dir).get("status") == "completed":
                    break  # every artefact is written: Ray's and the SuperLink's own shutdown (~4 s) is not waited for
                if time.monotonic() > deadline:
                    raise FlowerRunError(f"run exceeded its {timeout_s:g} s timeout")
                time.sleep(0.5)
            status = _await_status(run_dir, grace_s=15.0 if proc.returncode in (0, None) else 0.0, on_poll=on_poll)
        finally:
            stop_processes((proc, *extra_processes), flwr_home)
    on_poll()
    return status or {"status": "failed", "error": last_error(run_dir / LOG_FILE)}


def _nested(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return nested


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flwr_environment(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",  # offline: no `uv sync` (code 608)
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
    return env


def flwr_executable() -> str:
    local = Path(sys.executable).parent / "flwr"
    found = str(local) if local.is_file() else shutil.which("flwr")
    if not found:
        raise FlowerRunError("the `flwr` command is not installed (pip install 'flwr[simulation]')")
    return found


def _await_status(run_dir: Path, *, grace_s: float, on_poll: Callable[[], None]) -> dict[str, Any]:
    deadline = time.monotonic() + grace_s
    while True:
        status = read_status(run_dir)
        if status.get("status") in ("completed", "failed") or time.monotonic() > deadline:
            return status if status.get("status") != "running" else {}
        on_poll()
        time.sleep(0.5)


def processes_naming(marker: str) -> list[psutil.Process]:
    """Processes whose command line mentions marker (e.g. a run's FLWR_HOME or run directory)."""
    found = []
    for candidate in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in candidate.info["cmdline"] or []):
                found.append(candidate)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_processes(procs: tuple[subprocess.Popen, ...], flwr_home: Path) -> None:
    """Stop these processes and any Flower process naming this FLWR_HOME (a detached local SuperLink), with children."""
    roots = [psutil.Process(p.pid) for p in procs if p.poll() is None] + processes_naming(str(flwr_home))
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
    for p in procs:
        p.wait(timeout=10)


def last_error(log_path: Path) -> str:
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
