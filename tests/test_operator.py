"""A careless operator: a run directory that cannot be written, Ctrl-C, a one-site federation, a wrong --site (in process, no Flower)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import simulations.cli as sim_cli

runner = CliRunner()


@pytest.mark.parametrize("where", ["file", "below-a-file"])
def test_a_run_dir_that_cannot_be_written_is_one_line_and_exit_2(tmp_path: Path, where: str) -> None:
    # Prepare: as root every folder is writable, so "unwritable" is a path below a regular file
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    run_dir = blocker if where == "file" else blocker / "run"
    # Execute
    result = runner.invoke(sim_cli.app, ["run", "synthetic-tiny", "--run-dir", str(run_dir)])
    # Assert
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "--run-dir" in lines[0], result.output
    assert ("is a file" if where == "file" else "cannot be written") in lines[0]
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_ctrl_c_leaves_status_interrupted_not_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the ServerApp had written "running" when the operator pressed Ctrl-C
    def interrupted(plan, on_poll):
        (plan.run_dir / "status.json").write_text(json.dumps({"status": "running", "data-kind": "synthetic"}))
        raise KeyboardInterrupt

    monkeypatch.setattr(sim_cli, "run_simulation", interrupted)
    # Execute
    result = runner.invoke(sim_cli.app, ["run", "synthetic-tiny", "--sites", "1", "--run-dir", str(tmp_path / "run")])
    # Assert
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert result.exit_code == 130 and status["status"] == "interrupted" and status["data-kind"] == "synthetic"
    assert "ONE site" in result.output  # a one-site "federation" is said to be local training


def test_flower_server_marks_its_run_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import server.deploy
    from server.cli import app
    from server.keys import make_kit

    kit = make_kit(tmp_path / "certs", hosts=["localhost"], sites=["a", "b"])
    config = tmp_path / "federation.toml"
    config.write_text(f'[server]\nca-cert = "{kit.ca_cert}"\nserver-cert = "{kit.server_cert}"\n'
                      f'server-key = "{kit.server_key}"\nrun-dir = "run"\n'
                      f'site-keys = ["{kit.site_keys["a"][1]}", "{kit.site_keys["b"][1]}"]\n')

    def interrupted(fed, **_):
        Path(fed.server.run_dir).mkdir()
        (Path(fed.server.run_dir) / "status.json").write_text('{"status": "running"}')
        raise KeyboardInterrupt

    monkeypatch.setattr(server.deploy, "start_federation", interrupted)
    result = runner.invoke(app, ["start", "--config", str(config)])
    assert result.exit_code == 130, result.output
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "interrupted"


@pytest.mark.parametrize("site, ok", [("hospital-a", False), ("synthetic-hospital-7", True)])
def test_a_synthetic_site_name_is_checked_before_connecting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            site: str, ok: bool) -> None:
    import client.deploy
    from client.cli import app

    monkeypatch.setattr(client.deploy, "run_node", lambda *a, **k: 0)  # "connected": nothing is started here
    result = runner.invoke(app, ["start", "--site", site, "--server", "127.0.0.1:9", "--insecure",
                                 "--log-file", str(tmp_path / "n.log")])
    assert result.exit_code == (0 if ok else 1), result.output
    if not ok:
        assert "is not a synthetic site" in result.output and "synthetic-hospital-0" in result.output


def test_two_keys_for_one_site_are_refused_before_anything_starts(tmp_path: Path) -> None:
    from common.config import ConfigError
    from server.deploy import check_ready, load_federation
    from server.keys import make_kit
    from server.sites import key_site

    kit = make_kit(tmp_path / "certs", hosts=["localhost"], sites=["a"])
    copy = tmp_path / "other" / "a.pub"  # a second key file named for site a
    copy.parent.mkdir()
    copy.write_bytes(kit.site_keys["a"][1].read_bytes())
    config = tmp_path / "federation.toml"
    config.write_text(f'[server]\nport = 1\nca-cert = "{kit.ca_cert}"\nserver-cert = "{kit.server_cert}"\n'
                      f'server-key = "{kit.server_key}"\nsite-keys = ["{kit.site_keys["a"][1]}", "{copy}"]\n')
    with pytest.raises(ConfigError, match="two keys for site 'a'"):
        check_ready(load_federation(config), insecure=False)
    assert key_site(kit.site_keys["a"][1]) == "a"
