"""`flower-client start`: check this hospital's data, then run a Flower SuperNode for it, reconnecting as needed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import protocol as P
from common.ports import free_port
from client.refusals import INSECURE_AGAINST_TLS, Refusal, failed_messages, recognise, speaks_tls

REGISTRATION_WAIT_S = 2.0  # one retry after "not registered": the server may be registering site keys right now
# Flower 1.42 keeps a node ONLINE for 2 x 30 s after its last heartbeat (HEARTBEAT_PATIENCE x the fixed
# interval) and refuses to activate it again until then with the same code 2004 as for an unregistered key.
SESSION_HELD_S = 65.0
ALIVE_EVERY_S = 5.0  # how often a connected node records that it is alive (the session file)
HELD_RETRY_S = 5.0


@dataclass(frozen=True)
class NodeOptions:
    """How this hospital joins: its name, its data, the server and its credentials."""

    site: str
    data_root: Path | None
    server: str
    root_cert: Path | None = None
    auth_key: Path | None = None
    insecure: bool = False
    runtime_port: int | None = None
    max_restarts: int = 0  # 0 = keep trying forever
    connect_timeout: float = 60.0  # one SuperNode gives up connecting after this; then it is restarted
    warm: bool = True  # a warm worker (client.worker) keeps torch, model and data loaded between messages
    task_poll_interval: float = 0.1  # FLWR_SUPEREXEC_TASK_POLL_INTERVAL: how soon a pulled message gets its process


def supernode_command(opt: NodeOptions, port: int) -> list[str]:
    """The flower-supernode command line for this hospital."""
    node_config = f"site='{opt.site}'" + (f" data.root='{opt.data_root}'" if opt.data_root else "")
    cmd = [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", opt.server,
           "--port", str(port), "--node-config", node_config, "--max-wait-time", f"{opt.connect_timeout:g}"]
    if opt.insecure:
        cmd.append("--insecure")
    elif opt.root_cert:
        cmd += ["--root-certificates", str(opt.root_cert)]
    if opt.auth_key:
        cmd += ["--auth-supernode-private-key", str(opt.auth_key)]
    return cmd


def validate(opt: NodeOptions) -> None:
    """Fail early, naming the culprit, for what cannot work."""
    if not re.fullmatch(r"[^:\s]+:\d{1,5}", opt.server):
        raise ValueError(f"--server must be HOST:PORT (got '{opt.server}')")
    for flag, path in (("--root-cert", opt.root_cert), ("--auth-key", opt.auth_key)):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{flag}: file not found: {path}")
    if not opt.insecure and opt.root_cert is None:
        raise ValueError("TLS is on by default: pass --root-cert CA.crt (or --insecure for a local test)")
    if not 0.01 <= opt.task_poll_interval <= 60:
        raise ValueError(f"--task-poll-interval must be between 0.01 and 60 s (got {opt.task_poll_interval:g})")


def run_node(opt: NodeOptions, log_path: Path, say: Callable[[str], None]) -> int:
    """Run the SuperNode (and its warm worker); restart it after connection loss; stop for good, in one line, on a refusal."""
    from client.worker import started_worker

    if opt.insecure and speaks_tls(opt.server):  # Flower would retry this forever as "connection failed"
        say(f"error: {INSECURE_AGAINST_TLS}")
        return 1
    worker_log = log_path.with_name(f"{opt.site}-worker.log")
    with started_worker(worker_log, say) if opt.warm else contextlib.nullcontext({}) as worker_env:
        env = {**_environment(), **worker_env, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": f"{opt.task_poll_interval:g}"}
        return _supervise(opt, log_path, say, env)


def session_file(log_path: Path, site: str) -> Path:
    """Where a connected node records, every few seconds, that it is alive (read after a restart)."""
    return log_path.with_name(f"{site}-session.json")


def mark_alive(path: Path, opt: NodeOptions, now: float | None = None) -> None:
    """Record that this site's key is connected to this server now (atomic write)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"server": opt.server, "auth-key": str(opt.auth_key), "alive": time.time() if now is None else now}))
    tmp.replace(path)


def held_for(path: Path, opt: NodeOptions, now: float | None = None) -> float:
    """Seconds the server may still hold this site's previous connection (0 when none was recorded)."""
    try:
        record = json.loads(path.read_text())
        same = record["server"] == opt.server and record["auth-key"] == str(opt.auth_key)
        left = float(record["alive"]) + SESSION_HELD_S - (time.time() if now is None else now)
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0
    return min(max(left, 0.0), SESSION_HELD_S) if same else 0.0


def _supervise(opt: NodeOptions, log_path: Path, say: Callable[[str], None], env: dict[str, str]) -> int:
    restarts, retried, held_said = 0, False, False
    stop = {"now": False}
    session = session_file(log_path, opt.site)
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    while True:
        port = opt.runtime_port or free_port()
        if not retried:
            say(f"connecting to {opt.server} as '{opt.site}' (local runtime port {port})")
        with log_path.open("ab") as log:
            proc = subprocess.Popen(supernode_command(opt, port), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        tls_check = (lambda: speaks_tls(opt.server, timeout=2.0) is True) if opt.insecure else None
        code, refusal = _watch(proc, log_path, say, stop, tls_check, alive=lambda: mark_alive(session, opt))
        if stop["now"]:
            return 0
        held = held_for(session, opt) if refusal is not None and refusal.retry else 0.0
        if held > 0:  # this process (or its predecessor) was connected moments ago: the old session still counts
            if not held_said:
                say(f"the server still holds this site's previous connection (Flower keeps a node online up to 60 s "
                    f"after its last heartbeat); retrying for up to {held:.0f} s")
            retried, held_said = True, True
            time.sleep(min(HELD_RETRY_S, held))
            continue
        if refusal is not None and refusal.retry and not retried:
            retried = True  # once, quietly: the key may be registered a moment from now
            time.sleep(REGISTRATION_WAIT_S)
            continue
        if refusal is not None:
            if not refusal.linger_s:  # an identity refusal was said already
                say(f"error: {refusal.cause} (log: {log_path})")
            return 1
        retried, held_said = False, False
        restarts += 1
        if opt.max_restarts and restarts > opt.max_restarts:
            say(f"error: server {opt.server} not reachable or connection lost {restarts} times "
                f"(last exit code {code}); giving up (log: {log_path})")
            return 1
        wait = min(30, 2 * restarts)
        say(f"connection lost or server not reachable (exit code {code}); retrying in {wait} s")
        time.sleep(wait)


def _watch(proc: subprocess.Popen, log_path: Path, say: Callable[[str], None], stop: dict,
           tls_check: Callable[[], bool] | None = None,
           alive: Callable[[], None] | None = None) -> tuple[int, Refusal | None]:
    """Follow the SuperNode's output until it exits or refuses; report each failed message in one line.

    `tls_check` (an --insecure node): until the node is connected, probe every 2 s whether the server
    speaks TLS: Flower itself only retries, as for a server that is down. An identity refusal is said
    at once and the node kept a few seconds, so that its error reply reaches the server's round table.
    `alive` is called every few seconds while the node is connected.
    """
    seen = log_path.stat().st_size if log_path.exists() else 0
    refusal, connected, probed, marked = None, False, time.monotonic(), 0.0
    try:
        while proc.poll() is None and refusal is None and not stop["now"]:
            text, seen = _read_new(log_path, seen)
            connected = connected or "SuperNode ID:" in text
            if connected and alive is not None and time.monotonic() - marked >= ALIVE_EVERY_S:
                alive()
                marked = time.monotonic()
            refusal = _follow(text, say)
            if refusal is None and tls_check is not None and not connected and time.monotonic() - probed > 2.0:
                probed = time.monotonic()
                refusal = Refusal(INSECURE_AGAINST_TLS) if tls_check() else None
            time.sleep(0.5)
        if refusal is None:  # it exited: its last words may name the cause
            refusal = _follow(_read_new(log_path, seen, whole=True)[0], say)
        if refusal is not None and refusal.linger_s:
            say(f"error: {refusal.cause}; stopping (log: {log_path})")
            if proc.poll() is None:
                time.sleep(refusal.linger_s)
    except KeyboardInterrupt:
        stop["now"] = True
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return int(proc.wait()), refusal


def _read_new(log_path: Path, seen: int, *, whole: bool = False) -> tuple[str, int]:
    """Complete lines of SuperNode output after byte `seen` (everything when `whole`), and the new offset."""
    if not log_path.exists():
        return "", seen
    with log_path.open("rb") as fh:
        fh.seek(seen)
        data = fh.read()
    if not whole:  # a line still being written is read next time, whole
        data = data[: data.rfind(b"\n") + 1]
    return data.decode(errors="replace"), seen + len(data)


def _follow(text: str, say: Callable[[str], None]) -> Refusal | None:
    """New SuperNode output: connection news and failed messages said, a refusal returned."""
    for match in re.finditer(r"SuperNode ID: (\d+)", text):
        say(f"connected: SuperNode ID {match.group(1)}; waiting for rounds")
    refusal = recognise(text)
    for line in failed_messages(text):
        if P.REFUSED not in line:  # an identity refusal is said once, as the refusal
            say(f"a message failed here: {line}")
    return refusal


def _environment() -> dict[str, str]:
    """The SuperNode starts `flower-superexec` / `flwr-clientapp`: they must be found next to this Python."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1")
    return env
