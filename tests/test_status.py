"""`flower-server status`: the report from the run directory and the SuperLink's node list; no server → one line, exit 1."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.config import RunConfig
from common.ports import free_port
from common.rundir import RunDirectory
from server import status as status_module
from server.cli import app
from server.deploy import load_federation
from server.launch import write_connection


def _federation(tmp_path: Path) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(f'[server]\nport = {free_port()}\nrun-dir = "run"\n[run.federation]\nrounds = 10\n')
    return path


def test_no_server_running_is_one_line_and_exit_1(tmp_path: Path) -> None:
    config = _federation(tmp_path)
    for prepare in (lambda: None,  # never started here
                    lambda: write_connection(tmp_path / "run" / ".flwr", "histofed-federation",
                                             {"address": "127.0.0.1:9", "insecure": True})):  # started, now gone
        prepare()
        result = CliRunner().invoke(app, ["status", "--config", str(config)])
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and "no federation server answers" in lines[0], result.stderr


def test_the_report_names_sites_round_phase_metrics_and_time_left(tmp_path: Path, monkeypatch) -> None:
    fed = load_federation(_federation(tmp_path))
    run = RunDirectory.start(RunConfig().override({"output.run-dir": fed.server.run_dir}), data_kind="synthetic")
    for r, elapsed in ((0, 5.0), (1, 15.0), (2, 27.0)):  # 10 s and 12 s per round
        run.started = time.time() - elapsed
        run.log_round({"round": r, "global": {"accuracy": 0.5 + r / 10, "auc": 0.6}})
    run.log_timing([{"round": 3, "phase": "train", "node": 11, "site": "h-1", "sent": 1.0, "received": 2.0}])
    run.write_status("running", round=3, phase="train", **{"phase-since": time.time() - 4})
    nodes = [{"node-id": "11", "status": "online"}, {"node-id": "12", "status": "offline"}]
    monkeypatch.setattr(status_module, "list_nodes", lambda run: nodes)  # Flower's `flwr supernode list`

    report = status_module.federation_status(fed)
    text = "\n".join(status_module.status_lines(report))
    assert "sites connected now: 1 of 2" in text and "h-1 (node 11): online" in text and "? (node 12): offline" in text
    assert "round 3/10: train for 4" in text and "last metrics (round 2): accuracy 0.700" in text
    assert report.s_per_round == pytest.approx(11.0) and report.left_s == pytest.approx(88.0)
