"""`flower-sim` bad input: one line naming the culprit, non-zero exit, no traceback, nothing started."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from simulations.cli import app


def _run(*args: str) -> Result:
    """`flower-sim ARGS` in this process (nothing here starts Flower: bad input stops before it)."""
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "no-such-scenario"], "unknown scenario 'no-such-scenario'"),
        (["run", "synthetic-tiny", "--set", "train.lr=-3"], "'train.lr'"),
        (["run", "synthetic-tiny", "--set", "train.colour=red"], "unknown configuration key 'train.colour'"),
        (["run", "synthetic-tiny", "--set", "oops"], "bad --set 'oops'"),
        (["run", "synthetic-tiny", "--set", "model.pretrained=true"], "pretrained-path"),
        (["run", "synthetic-tiny", "--set", "model.pretrained-path=/nonexistent/w.safetensors"], "file not found"),
        (["run", "synthetic-tiny", "--sites", "0"], "'federation.num-sites'"),
        (["run", "synthetic-tiny", "--resume"], "nothing to resume"),
        (["run", "synthetic-tiny", "--ray-address", "head-without-port"], "--ray-address must be HOST:PORT"),
        (["run", "synthetic-tiny", "--set", "federation.evaluate-with-train=true", "--set", "federation.fraction-train=0.5"],
         "evaluate-with-train needs"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], fragment: str) -> None:
    result = _run(*args, "--run-dir", str(tmp_path / "run"))
    assert result.exit_code == 2, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "run" / "flower.log").exists()  # nothing was started


def test_scenarios_are_listed(tmp_path: Path) -> None:
    result = _run("scenarios")
    assert result.exit_code == 0 and "synthetic-3sites (default)" in result.stdout


def test_bad_privacy_settings_are_refused_before_flower_starts(tmp_path: Path) -> None:
    result = _run("run", "synthetic-tiny", "--set", "privacy.mode=local", "--set", "privacy.delta=0.5",
                  "--run-dir", str(tmp_path / "run"))
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "run" / "flower.log").exists()
