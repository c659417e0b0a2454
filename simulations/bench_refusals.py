"""Benchmark: seconds until `flower-client start` refuses, in one line with exit 1, for each way a hospital cannot join (loopback).

Usage: python -m simulations.bench_refusals [--out refusals.json]
Starts a TLS + node-authentication SuperLink (one site key registered) and an --insecure one, then times
`flower-client start` from launch to exit for: an unregistered key, no key, a certificate from another CA,
--insecure against TLS, TLS against an insecure server. The goal is ≤ 15 s each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from server.launch import flwr_environment, flwr_executable, write_connection
from server.keys import make_kit
from simulations.figures import emit

BIN = Path(sys.executable).parent
GOAL_S = 15.0


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _superlink(tmp: Path, kit, *, tls: bool) -> tuple[subprocess.Popen, int, Path]:
    port, home = _port(), tmp / f"home-{'tls' if tls else 'insecure'}"
    cmd = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port), "--database",
           str(tmp / f"state-{port}.db"), "--disable-runtime-dependency-installation"]
    cmd += (["--ssl-ca-certfile", str(kit.ca_cert), "--ssl-certfile", str(kit.server_cert), "--ssl-keyfile",
             str(kit.server_key), "--enable-supernode-auth"] if tls else ["--insecure"])
    proc = subprocess.Popen(cmd, stdout=(tmp / f"superlink-{port}.log").open("wb"), stderr=subprocess.STDOUT,
                            env=flwr_environment(home), start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port, home
        time.sleep(0.3)
    raise RuntimeError("the SuperLink did not listen within 60 s")


def _register(home: Path, port: int, kit, public: Path) -> None:
    write_connection(home, "bench", {"address": f"127.0.0.1:{port}", "root-certificates": str(kit.ca_cert)})
    for _ in range(10):
        done = subprocess.run([flwr_executable(), "supernode", "register", str(public), "bench"], capture_output=True,
                              text=True, env=flwr_environment(home), timeout=120)
        if done.returncode == 0 and "error" not in (done.stdout + done.stderr).lower():
            return
        time.sleep(1)
    raise RuntimeError(f"could not register {public}")


def time_refusal(tmp: Path, name: str, port: int, credentials: list[str]) -> dict:
    """Launch `flower-client start` and time it until it exits; its error lines and exit code."""
    cmd = [str(BIN / "flower-client"), "start", "--site", "synthetic-hospital-0", "--server", f"127.0.0.1:{port}",
           *credentials, "--log-file", str(tmp / f"{name}.log")]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    errors = [ln.split("error:", 1)[1].strip() for ln in out.splitlines() if "error:" in ln]
    return {"seconds": round(seconds, 1), "exit": proc.returncode, "error-lines": len(errors),
            "line": errors[0] if errors else out.strip().splitlines()[-1:]}


def main(argv: list[str] | None = None) -> dict:
    """Run every refusal case once and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="histofed-refusals-"))
    kit = make_kit(tmp / "kit", hosts=["localhost", "127.0.0.1"], sites=["hospital-a"])
    stranger = make_kit(tmp / "stranger", hosts=["localhost"], sites=["rogue"])
    tls, tls_port, home = _superlink(tmp, kit, tls=True)
    plain, plain_port, _ = _superlink(tmp, kit, tls=False)
    try:
        _register(home, tls_port, kit, kit.site_keys["hospital-a"][1])
        ca, key = str(kit.ca_cert), str(kit.site_keys["hospital-a"][0])
        cases = {
            "unregistered key": (tls_port, ["--root-cert", ca, "--auth-key", str(stranger.site_keys["rogue"][0])]),
            "no key": (tls_port, ["--root-cert", ca]),
            "certificate of another CA": (tls_port, ["--root-cert", str(stranger.ca_cert), "--auth-key", key]),
            "--insecure against TLS": (tls_port, ["--insecure"]),
            "TLS against --insecure server": (plain_port, ["--root-cert", ca, "--auth-key", key]),
        }
        result = {name: time_refusal(tmp, name.replace(" ", "-"), port, creds) for name, (port, creds) in cases.items()}
    finally:
        for proc in (tls, plain):
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {"goal-s": GOAL_S, "cases": result,
               "all within goal": all(r["seconds"] <= GOAL_S and r["exit"] == 1 and r["error-lines"] == 1
                                      for r in result.values())}
    rows = [(name, f"{r['seconds']:>5} s  exit {r['exit']}  {r['error-lines']} line: {r['line']}") for name, r in result.items()]
    return emit([*rows, ("all within goal", summary["all within goal"])], summary, args.out)


if __name__ == "__main__":
    main()
