"""`flower-sim` bad input: one line naming the culprit, non-zero exit, no traceback, nothing started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FLOWER_SIM = str(Path(sys.executable).parent / "flower-sim")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([FLOWER_SIM, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


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
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], fragment: str) -> None:
    result = _run(*args, "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "run" / "flower.log").exists()  # nothing was started


def test_scenarios_are_listed(tmp_path: Path) -> None:
    result = _run("scenarios", cwd=tmp_path)
    assert result.returncode == 0 and "synthetic-3sites (default)" in result.stdout


def test_bad_privacy_settings_are_refused_before_flower_starts(tmp_path: Path) -> None:
    result = _run("run", "synthetic-tiny", "--set", "privacy.mode=local", "--set", "privacy.delta=0.5",
                  "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "run" / "flower.log").exists()
