"""`flower-server start`: a TLS + node-authenticated SuperLink, site-key registration, the histofed run, clean-up."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.config import PUBLIC_PRETRAINED, RunConfig
from common.errors import ConfigError
from common.rundir import RunDirectory
from server.launch import (
    FlowerRunError, find_app_dir, flwr_environment, flwr_executable, submit_and_wait, write_connection,
    write_run_config,
)
from server.sites import key_site, problem_text, read_node_sites, write_node_sites

CONNECTION = "histofed-federation"


class ServerSettings(BaseModel):
    """The [server] table of federation.toml."""

    model_config = ConfigDict(extra="forbid", alias_generator=lambda n: n.replace("_", "-"), populate_by_name=True)

    host: str = Field("0.0.0.0", description="interface the SuperLink binds (0.0.0.0 = all)")
    port: int = Field(9093, ge=1, le=65535, description="the one port hospitals connect to")
    address: str = Field("", description="how this machine reaches the SuperLink ('' = 127.0.0.1:port)")
    ca_cert: str = Field("", description="consortium CA certificate")
    server_cert: str = Field("", description="server certificate (SAN = the host names sites use)")
    server_key: str = Field("", description="server private key")
    site_keys: list[str] = Field(default_factory=list, description="public keys of the admitted sites")
    run_dir: str = Field("runs/federation", description="run directory (state database, metrics, checkpoints)")
    timeout_s: float = Field(7 * 86400.0, gt=0, description="wall-clock limit of the run")


@dataclass(frozen=True)
class Federation:
    """A validated federation.toml: server settings (paths absolute) and the histofed run config."""

    server: ServerSettings
    run: RunConfig


def load_federation(path: Path) -> Federation:
    """Read and validate federation.toml; relative paths are relative to the file. One-line ConfigError."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"federation config not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    unknown = sorted(set(raw) - {"server", "run"})
    if unknown:
        raise ConfigError(f"{path}: unknown section [{unknown[0]}] (expected [server] and [run.*])")
    try:
        server = ServerSettings.model_validate(raw.get("server", {}))
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: [server] {key}: {first['msg']}") from None
    base = path.parent.resolve()
    absolute = lambda p: str((base / p).resolve()) if p else ""  # noqa: E731
    server = server.model_copy(update={
        "ca_cert": absolute(server.ca_cert), "server_cert": absolute(server.server_cert),
        "server_key": absolute(server.server_key), "site_keys": [absolute(k) for k in server.site_keys],
        "run_dir": absolute(server.run_dir),
    })
    return Federation(server, RunConfig.validate_nested(raw.get("run", {})))


def check_ready(fed: Federation, *, insecure: bool) -> None:
    """Files exist, the port is free: otherwise a one-line error naming the culprit, before anything starts."""
    s = fed.server
    if fed.run.model.pretrained_path == PUBLIC_PRETRAINED:  # flower-sim pretrains on its own; a coordinator does it first
        raise ConfigError("model.pretrained-path = 'public': run `flower-server pretrain --out FILE` once and set "
                          "model.pretrained-path to that file")
    needed = {"site-keys": s.site_keys} if insecure else {
        "ca-cert": [s.ca_cert], "server-cert": [s.server_cert], "server-key": [s.server_key], "site-keys": s.site_keys,
    }
    for key, paths in needed.items():
        for p in paths:
            if not p or not Path(p).is_file():
                raise ConfigError(f"[server] {key}: file not found: {p or '(not set)'} (make them with `flower-server keys`)")
    if not insecure and not s.site_keys:
        raise ConfigError("[server] site-keys is empty: node authentication admits no site")
    names = [key_site(Path(k)) for k in s.site_keys]  # a key's file name is its site: two keys, one site is ambiguous
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"[server] site-keys: two keys for site '{twice[0]}' (a key's file name names its site)")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no conflict
        try:
            sock.bind((s.host, s.port))
        except OSError as err:
            raise ConfigError(f"port {s.port} on {s.host} is not available ({err.strerror})") from None


def superlink_command(fed: Federation, run: RunDirectory, *, insecure: bool) -> list[str]:
    """flower-superlink with TLS and SuperNode authentication (or --insecure), state in the run directory."""
    s = fed.server
    cmd = [str(Path(sys.executable).parent / "flower-superlink"), "--host", s.host, "--port", str(s.port),
           "--database", str(run.file(RunDirectory.STATE_DB)), "--disable-runtime-dependency-installation"]
    if insecure:
        return cmd + ["--insecure"]
    return cmd + ["--ssl-ca-certfile", s.ca_cert, "--ssl-certfile", s.server_cert, "--ssl-keyfile", s.server_key,
                  "--enable-supernode-auth"]


def start_federation(
    fed: Federation, *, insecure: bool, resume: bool, say: Callable[[str], None],
) -> dict[str, Any]:
    """Start the SuperLink, register site keys, submit and follow the run; stop everything at the end."""
    run = RunDirectory(Path(fed.server.run_dir))
    if resume and not run.has_checkpoint():
        raise ConfigError(f"nothing to resume: {run.file(RunDirectory.CHECKPOINT)} does not exist")
    if not resume and run.path.exists() and any(run.path.iterdir()):
        raise ConfigError(f"run directory {run.path} exists and is not empty (use --resume to continue it)")
    check_ready(fed, insecure=insecure)
    run.path.mkdir(parents=True, exist_ok=True)
    address = fed.server.address or f"127.0.0.1:{fed.server.port}"
    write_connection(run.flwr_home, CONNECTION, {"address": address, "insecure": True} if insecure
                     else {"address": address, "root-certificates": fed.server.ca_cert})
    cfg = fed.run.override({"output.run-dir": str(run.path), "output.resume": resume})
    config_path = write_run_config(cfg, run)
    superlink_log = run.file(RunDirectory.SUPERLINK_LOG)
    with superlink_log.open("ab") as log:
        superlink = subprocess.Popen(superlink_command(fed, run, insecure=insecure), stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                     env=flwr_environment(run.flwr_home))
    try:
        _wait_listening(superlink, fed.server.port, superlink_log)
        say(f"SuperLink listening on {fed.server.host}:{fed.server.port} ({'INSECURE' if insecure else 'TLS + node authentication'})")
        nodes = _register_sites(fed.server.site_keys, run, say)
        if not insecure:  # with node authentication a node id is its key: the ServerApp binds sites to nodes
            write_node_sites(run, nodes)
    except BaseException:
        superlink.terminate()
        superlink.wait(timeout=10)
        raise
    seen = {"n": len(run.history())}

    def poll() -> None:
        history = run.history()
        for record in history[seen["n"]:]:
            g = record["global"]
            say(f"round {record['round']}/{cfg.federation.rounds}: global accuracy {g.get('accuracy', 0):.3f}, "
                f"sites {', '.join(sorted(record.get('sites', {})))}{problem_text(record)}")
        seen["n"] = len(history)

    cmd = [flwr_executable(), "run", str(find_app_dir()), CONNECTION, "--stream", "--run-config", str(config_path)]
    say(f"run submitted; waiting for at least {cfg.federation.min_available_sites} sites")
    return submit_and_wait(cmd, run, timeout_s=fed.server.timeout_s, on_poll=poll, extra_processes=(superlink,))


def _wait_listening(proc: subprocess.Popen, port: int, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise FlowerRunError(f"flower-superlink exited with code {proc.returncode}: {' '.join(tail)} (log: {log})")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise FlowerRunError(f"flower-superlink did not listen on port {port} within {timeout:g} s (log: {log})")


def _register_sites(keys: list[str], run: RunDirectory, say: Callable[[str], None]) -> dict[int, str]:
    """Register every site key; node id → site (the key's file name). A resumed run's keys are already registered."""
    known = {site: node for node, site in read_node_sites(run).items()}
    nodes: dict[int, str] = {}
    for key in keys:
        site = key_site(Path(key))
        node = _register(key, run.flwr_home) or known.get(site)
        if node is None:
            raise FlowerRunError(f"site key {key} is registered already but {run.file(RunDirectory.NODE_SITES)} does not "
                                 "name its node (a state database from another run?)")
        nodes[node] = site
        say(f"registered site key {Path(key).name}: site {site} is node {node}")
    return nodes


def _register(key: str, flwr_home: Path) -> int | None:
    """`flwr supernode register`: the node id Flower gives this key, or None when the key is registered already."""
    for attempt in range(10):  # the Control API can lag the port by a moment
        done = subprocess.run([flwr_executable(), "supernode", "register", key, CONNECTION, "--format", "json"],
                              capture_output=True, text=True, env=flwr_environment(flwr_home), timeout=120)
        out = done.stdout + done.stderr
        reply = _json_reply(done.stdout)
        if reply.get("success") and reply.get("node-id"):
            return int(reply["node-id"])
        if "already in use" in out.lower():
            return None
        time.sleep(1.0 + attempt)
    raise FlowerRunError(f"could not register site key {key}: {out.strip().splitlines()[-1] if out.strip() else done.returncode}")


def _json_reply(stdout: str) -> dict[str, Any]:
    start = stdout.find("{")
    try:
        return json.loads(stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}
