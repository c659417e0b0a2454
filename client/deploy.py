"""`flower-client start`: check this hospital's data, then run a Flower SuperNode for it, reconnecting as needed."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.ports import free_port

PERMANENT = {  # supernode output → one-line cause; these do not get better by retrying
    "CERTIFICATE_VERIFY_FAILED": "TLS: the server's certificate is not signed by the CA given with --root-cert",
    "WRONG_VERSION_NUMBER": "TLS: the server does not speak TLS (started with --insecure?)",
}
REFUSED = {  # retried a few times first: a server that just started may still be registering site keys
    "code: 2004": "the server refused this site's key: it is not registered (flwr supernode register)",
    "code: 2001": "the server requires node authentication: pass --auth-key",
}
REFUSAL_RETRIES = 4


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
    """Run the SuperNode (and its warm worker); restart it after connection loss; stop for good on auth/TLS refusal."""
    from client.worker import started_worker

    worker_log = log_path.with_name(f"{opt.site}-worker.log")
    with started_worker(worker_log, say) if opt.warm else contextlib.nullcontext({}) as worker_env:
        env = {**_environment(), **worker_env, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": f"{opt.task_poll_interval:g}"}
        return _supervise(opt, log_path, say, env)


def _supervise(opt: NodeOptions, log_path: Path, say: Callable[[str], None], env: dict[str, str]) -> int:
    restarts = refusals = 0
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    while True:
        port = opt.runtime_port or free_port()
        say(f"connecting to {opt.server} as '{opt.site}' (local runtime port {port})")
        with log_path.open("ab") as log:
            proc = subprocess.Popen(supernode_command(opt, port), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        code = _watch(proc, log_path, say, stop)
        if stop["now"]:
            return 0
        cause = _cause(log_path, PERMANENT)
        refused = _cause(log_path, REFUSED)
        refusals = refusals + 1 if refused else 0
        if cause or refusals > REFUSAL_RETRIES:
            say(f"error: {cause or refused} (log: {log_path})")
            return 1
        restarts += 1
        if opt.max_restarts and restarts > opt.max_restarts:
            say(f"error: server {opt.server} not reachable or connection lost {restarts} times "
                f"(last exit code {code}); giving up (log: {log_path})")
            return 1
        wait = min(30, 2 * restarts)
        say(f"connection lost or server not reachable (exit code {code}); retrying in {wait} s")
        time.sleep(wait)


def _watch(proc: subprocess.Popen, log_path: Path, say: Callable[[str], None], stop: dict) -> int:
    seen = log_path.stat().st_size if log_path.exists() else 0
    try:
        while proc.poll() is None:
            if stop["now"]:
                break
            text = log_path.read_text(errors="replace")[seen:] if log_path.exists() else ""
            for match in re.finditer(r"SuperNode ID: (\d+)", text):
                say(f"connected: SuperNode ID {match.group(1)}; waiting for rounds")
            seen += len(text)
            time.sleep(1.0)
    except KeyboardInterrupt:
        stop["now"] = True
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return int(proc.wait())


def _environment() -> dict[str, str]:
    """The SuperNode starts `flower-superexec` / `flwr-clientapp`: they must be found next to this Python."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def _cause(log_path: Path, causes: dict[str, str]) -> str:
    """The cause named by the last SuperNode attempt's output, if any."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    tail = text[text.rfind("Starting Flower SuperNode"):] if "Starting Flower SuperNode" in text else text[-6000:]
    return next((cause for marker, cause in causes.items() if marker in tail), "")
