"""Deployment with real processes on loopback: `flower-server start` + `flower-client start`, TLS and node auth."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest
import tomli_w

from common.datasets.registry import get_dataset
from server.keys import make_kit

BIN = Path(sys.executable).parent
TINY_RUN = {
    "model": {"backbone": "test_efficientnet", "image-size": 32, "token-dim": 8, "hidden-size": 8},
    "data": {"dataset": "breakhis"},
    "train": {"batch-size": 8, "num-threads": 1},
}


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _federation(tmp: Path, kit, *, rounds: int, sites: int, run_dir: str = "run", available: int = 0) -> Path:
    port = _port()
    run = json.loads(json.dumps(TINY_RUN))
    run["federation"] = {"num-sites": sites, "rounds": rounds, "min-train-sites": 2, "min-evaluate-sites": 2,
                         "min-available-sites": available or sites, "round-timeout-s": 600.0}
    config = {
        "server": {"host": "127.0.0.1", "port": port, "ca-cert": str(kit.ca_cert), "server-cert": str(kit.server_cert),
                   "server-key": str(kit.server_key), "run-dir": run_dir,
                   "site-keys": [str(pub) for _, pub in kit.site_keys.values()]},
        "run": run,
    }
    path = tmp / f"federation-{run_dir}.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def _server(config: Path, *extra: str, out: Path | None = None) -> subprocess.Popen:
    sink = out.open("w") if out else subprocess.PIPE
    return subprocess.Popen([str(BIN / "flower-server"), "start", "--config", str(config), *extra],
                            stdout=sink, stderr=subprocess.STDOUT, text=True, cwd=config.parent,
                            start_new_session=True)


def _client(tmp: Path, site: str, port: int, key: Path | None, ca: Path | None, data: Path, *,
            name: str = "") -> subprocess.Popen:
    tls = ["--root-cert", str(ca)] if ca else ["--insecure"]
    return subprocess.Popen(
        [str(BIN / "flower-client"), "start", "--site", site, "--server", f"127.0.0.1:{port}", *tls,
         *(["--auth-key", str(key)] if key else []), "--dataset", "breakhis", "--data-root", str(data),
         "--log-file", str(tmp / f"{name or site}.log")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp, start_new_session=True,
        env={**os.environ, "HISTOFED_CACHE": str(tmp / f"cache-{name or site}")},
    )


def _refused(proc: subprocess.Popen, started: float) -> tuple[str, float]:
    """The client's output and how long it took to exit after `started`."""
    out, _ = proc.communicate(timeout=300)
    return out, time.monotonic() - started


def _kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _wait(deadline: float, done) -> None:
    while time.monotonic() < deadline and not done():
        time.sleep(1)


def _rounds(run: Path) -> list[dict]:
    metrics = run / "metrics.jsonl"
    return [json.loads(ln) for ln in metrics.read_text().splitlines()] if metrics.is_file() else []


@pytest.mark.slow
def test_tls_federation_rejects_strangers_survives_a_killed_site_and_resumes(tmp_path: Path) -> None:
    """One deployment (suite time): strangers and an impostor refused, a hospital kill -9'd mid-round, the server killed and resumed.

    That a resumed run ends on the very weights of an uninterrupted one is checked in simulation
    (tests/test_e2e.py); here the processes, TLS, node auth and Flower's state DB are what is tested.
    """
    kit = make_kit(tmp_path / "certs", hosts=["localhost", "127.0.0.1"], sites=["h-1", "h-2", "h-3", "h-4"])
    data = {s: get_dataset("breakhis").write_fixture(tmp_path / f"data-{s}", size=(70, 46), seed=i)
            for i, s in enumerate(kit.site_keys)}
    fed = _federation(tmp_path, kit, rounds=2, sites=3, available=2)
    port = tomllib.loads(fed.read_text())["server"]["port"]
    tracked = _with_mlflow(fed, tmp_path / "mlflow.db")  # issue 18: MLflow; the resume continues the same MLflow run
    server_out = tmp_path / "server.out"
    server = _server(fed, out=server_out)
    started = [server]
    try:
        # refusals while the server starts: each one line, exit 1 (times printed; bench_refusals measures them)
        stranger = make_kit(tmp_path / "stranger", hosts=["localhost"], sites=["rogue"])
        t0 = time.monotonic()
        refusing = {
            "not registered": _client(tmp_path, "rogue", port, stranger.site_keys["rogue"][0], kit.ca_cert, data["h-1"]),
            "not signed by the CA": _client(tmp_path, "h-1", port, kit.site_keys["h-1"][0], stranger.ca_cert, data["h-1"],
                                            name="wrong-ca"),
            "speaks TLS but --insecure": _client(tmp_path, "h-1", port, None, None, data["h-1"], name="insecure"),
        }
        started += list(refusing.values())
        _wait(time.monotonic() + 120, lambda: "run submitted" in server_out.read_text())  # site keys registered
        clients = {s: _client(tmp_path, s, port, kit.site_keys[s][0], kit.ca_cert, data[s]) for s in ("h-1", "h-2", "h-3")}
        started += list(clients.values())
        # an impostor: h-4's registered key, but calling itself h-1; connected from the start, so sampled in round 0 or 1
        impostor = _client(tmp_path, "h-1", port, kit.site_keys["h-4"][0], kit.ca_cert, data["h-4"], name="impostor")
        started.append(impostor)
        refusing["pass --auth-key"] = _client(tmp_path, "h-2", port, None, kit.ca_cert, data["h-2"], name="no-key")
        started.append(refusing["pass --auth-key"])
        for fragment, proc in refusing.items():
            out, seconds = _refused(proc, t0)
            lines = [ln for ln in out.splitlines() if "error:" in ln]
            assert proc.returncode == 1 and len(lines) == 1 and fragment in lines[0], out
            print(f"refused ({fragment}) {seconds:.0f} s after the server was launched")

        run, deadline = tmp_path / "run", time.monotonic() + 600
        _wait(deadline, lambda: len(_rounds(run)) >= 1)  # round 0 evaluated: round 1 training starts now
        killed_at = time.monotonic()
        _kill_tree(clients["h-3"])  # kill -9 the hospital's SuperNode (and any ClientApp) mid-round
        _wait(deadline, lambda: len(_rounds(run)) >= 2)  # round 1 closes once Flower gives up on the dead node
        round_closed = time.monotonic() - killed_at
        assert json.loads((run / "checkpoint.json").read_text())["round"] == 1
        out, _ = impostor.communicate(timeout=120)
        assert impostor.returncode == 1 and "registered for site 'h-4' but it calls itself 'h-1'" in out, out
        # the server's round table names the key's site and the claim (in the first round that sampled the impostor)
        refused = next((r["failed"]["h-4"] for r in _rounds(run)[:2] if "h-4" in r.get("failed", {})), _rounds(run)[:2])
        assert "SiteRefused" in refused and "'h-4'" in refused and "'h-1'" in refused, refused
        _kill_tree(server)  # now the server and its SuperLink die after round 1
        server.wait(timeout=30)
        down = _run(BIN / "flower-server", "status", "--config", fed, cwd=tmp_path)  # issue 18: status, no server
        assert down.returncode == 1 and len(down.stderr.strip().splitlines()) == 1, down.stdout + down.stderr
        assert "no federation server answers" in down.stderr

        resumed = _server(fed, "--resume")
        started.append(resumed)
        live = _status_once_up(fed, tmp_path)  # issue 18: status of the live (resumed) federation
        assert "sites connected now" in live and "last metrics (round 1)" in live and "time per round" in live, live
        out, _ = resumed.communicate(timeout=900)
        assert resumed.returncode == 0, out
        lines = _rounds(run)
        assert [ln["round"] for ln in lines] == [0, 1, 2]
        assert sorted(lines[1]["train"]) == ["h-1", "h-2"] and sorted(lines[2]["sites"]) == ["h-1", "h-2"]
        assert lines[-1]["data-kind"] == "synthetic"  # the sites said so: their trees are generated fixtures
        assert json.loads((run / "checkpoint.json").read_text())["round"] == 2 and (run / "model.safetensors").is_file()
        declared = json.loads((run / "partition.json").read_text())["sites"]
        assert declared["h-1"]["train"] > 0 and declared["h-1"]["node"] is not None  # kept across the resume
        assert (run / "report.html").is_file() and (run / "report" / "curves.png").is_file()
        status = json.loads((run / "status.json").read_text())
        assert "h-4" in status["sites-failed"] and "h-3" in lines[1].get("failed", {}), status  # listed, also after the resume
        assert [m.step for m in tracked()] == [0, 1, 2]  # one MLflow run, every round
        print(f"round 1 closed {round_closed:.0f} s after the kill (upper bound on detection)")
    finally:
        for proc in started:
            _kill_tree(proc)


def _with_mlflow(fed: Path, db: Path):
    """Track the federation in a local MLflow store; returns a reader of its global.accuracy history."""
    config = tomllib.loads(fed.read_text())
    config["run"]["output"] = {"mlflow-uri": f"sqlite:///{db}"}
    fed.write_text(tomli_w.dumps(config))

    def history() -> list:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        (run,) = client.search_runs([client.get_experiment_by_name("histofed").experiment_id])
        return client.get_metric_history(run.info.run_id, "global.accuracy")

    return history


def _status_once_up(fed: Path, cwd: Path, timeout: float = 180) -> str:
    """`flower-server status` output once the server answers."""
    deadline = time.monotonic() + timeout
    while True:
        result = _run(BIN / "flower-server", "status", "--config", fed, cwd=cwd)
        if result.returncode == 0 or time.monotonic() > deadline:
            assert result.returncode == 0, result.stdout + result.stderr
            return result.stdout
        time.sleep(2)


def _run(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_server_bad_input_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    kit = make_kit(tmp_path / "certs", hosts=["localhost"], sites=["a", "b"])
    good = _federation(tmp_path, kit, rounds=1, sites=2)
    text = good.read_text()
    port = tomllib.loads(text)["server"]["port"]
    cases = {
        "unknown.toml": (text.replace("[run.model]", "[run.model]\ncolour = \"red\""), "unknown configuration key 'model.colour'"),
        "nocert.toml": (text.replace(str(kit.server_cert), str(tmp_path / "missing.pem")), "server-cert: file not found"),
    }
    for name, (body, fragment) in cases.items():
        (tmp_path / name).write_text(body)
        result = _run(BIN / "flower-server", "start", "--config", tmp_path / name, cwd=tmp_path)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = _run(BIN / "flower-server", "start", "--config", good, cwd=tmp_path)
    assert result.returncode == 2 and f"port {port}" in result.stderr and "not available" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was started, nothing written


def test_client_bad_input(tmp_path: Path) -> None:
    kit = make_kit(tmp_path / "certs", hosts=["localhost"], sites=["a"])
    key, ca = kit.site_keys["a"][0], kit.ca_cert
    missing = _run(BIN / "flower-client", "start", "--site", "a", "--server", "127.0.0.1:9", "--root-cert", ca,
                   "--auth-key", key, "--dataset", "breakhis", "--data-root", tmp_path / "nope", cwd=tmp_path)
    assert missing.returncode == 1 and "data root not found" in missing.stderr
    nowhere = _run(BIN / "flower-client", "start", "--site", "synthetic-hospital-0", "--server", f"127.0.0.1:{_port()}",
                   "--root-cert", ca, "--auth-key", key, "--max-restarts", "1", "--connect-timeout", "3",
                   "--log-file", tmp_path / "a.log", cwd=tmp_path)
    assert nowhere.returncode == 1 and "not reachable" in nowhere.stdout, nowhere.stdout + nowhere.stderr
    bad = _run(BIN / "flower-client", "start", "--site", "a", "--server", "no-port", "--insecure", cwd=tmp_path)
    assert bad.returncode == 1 and "HOST:PORT" in bad.stderr
