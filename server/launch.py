"""Driving Flower's own processes from histofed: connections, `flwr run` submission, waiting on the run, clean-up.

The simulation (`flower-sim`) and deployment (`flower-server start`) commands share these helpers;
they follow the run through the run directory the ServerApp writes (common.rundir).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from common.config import RunConfig
from common.ports import free_port
from common.rundir import RunDirectory


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


def write_connection(flwr_home: Path, name: str, connection: Mapping[str, Any]) -> None:
    """A private FLWR_HOME/config.toml with one named SuperLink connection (the user's ~/.flwr untouched)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": name, name: dict(connection)}}))


def write_run_config(cfg: RunConfig, run: RunDirectory) -> Path:
    """The flat run config as the nested TOML file `flwr run --run-config` accepts, in the run directory."""
    path = run.file(RunDirectory.RUN_CONFIG)
    path.write_text(tomli_w.dumps(_nested(cfg.to_flat())))
    return path


def submit_and_wait(
    cmd: list[str], run: RunDirectory, *, timeout_s: float, on_poll: Callable[[], None],
    extra_processes: tuple[subprocess.Popen, ...] = (), env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run `flwr run ... --stream` (extra `env` for Flower's processes), wait, stop what it started (and extra_processes); return the status."""
    deadline = time.monotonic() + timeout_s
    run.clear_status()  # a resumed run's old "completed" must not end this one
    flower_log = run.file(RunDirectory.FLOWER_LOG)
    with flower_log.open("ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**flwr_environment(run.flwr_home), **(env or {})},
            cwd=run.path, start_new_session=True,
        )
        try:
            while proc.poll() is None:
                on_poll()
                if run.read_status().get("status") == "completed":
                    break  # every artefact is written: Ray's and the SuperLink's own shutdown (~4 s) is not waited for
                if time.monotonic() > deadline:
                    raise FlowerRunError(f"run exceeded its {timeout_s:g} s timeout")
                time.sleep(0.5)
            status = _await_status(run, grace_s=15.0 if proc.returncode in (0, None) else 0.0, on_poll=on_poll)
        finally:
            stop_processes((proc, *extra_processes), run.flwr_home)
    on_poll()
    return status or {"status": "failed", "error": last_error(flower_log)}


def _nested(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return nested


def flwr_environment(flwr_home: Path) -> dict[str, str]:
    """Environment of every Flower process histofed starts: private FLWR_HOME, offline, free local ports."""
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
    """The `flwr` command next to this Python (or on PATH)."""
    local = Path(sys.executable).parent / "flwr"
    found = str(local) if local.is_file() else shutil.which("flwr")
    if not found:
        raise FlowerRunError("the `flwr` command is not installed (pip install 'flwr[simulation]')")
    return found


def _await_status(run: RunDirectory, *, grace_s: float, on_poll: Callable[[], None]) -> dict[str, Any]:
    deadline = time.monotonic() + grace_s
    while True:
        status = run.read_status()
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
