"""`flower-client check-data`: per site/split counts, warnings for unreadable files, clear failures."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from client.cli import app
from common.datasets.registry import get_dataset


def _check(*args: str) -> Result:
    """`flower-client check-data ARGS` in this process."""
    return CliRunner().invoke(app, ["check-data", *args])


def test_synthetic_data_checks_out(tmp_path: Path) -> None:
    result = _check("--sites", "2")
    assert result.exit_code == 0, result.stderr
    assert "SYNTHETIC" in result.stdout and "synthetic-hospital-1" in result.stdout and "ok:" in result.stdout


@pytest.mark.parametrize("dataset", ["breakhis", "camelyon17"])
def test_generated_tree_checks_out_and_corruption_is_reported(tmp_path: Path, dataset: str) -> None:
    small = {"size": (70, 46)} if dataset == "breakhis" else {}  # every image is decoded three times: keep them small
    root = get_dataset(dataset).write_fixture(tmp_path / "data", seed=1, **small)
    cache = ["--set", f"data.cache-dir={tmp_path / 'cache'}"]
    sites = ["--sites", "2"] if dataset == "breakhis" else []
    ok = _check("--dataset", dataset, "--root", str(root), *sites, *cache)
    assert ok.exit_code == 0, ok.stdout + ok.stderr
    assert "train" in ok.stdout and "test" in ok.stdout

    victim = next(p for p in sorted(root.rglob("*.png")) if dataset != "breakhis" or "200X" in p.parts)
    victim.write_bytes(victim.read_bytes()[:40])
    warned = _check("--dataset", dataset, "--root", str(root), *sites, *cache)
    assert warned.exit_code == 0 and "1 unreadable image(s)" in warned.stderr and victim.name in warned.stderr
    strict = _check("--dataset", dataset, "--root", str(root), *sites, *cache, "--set", "data.strict=true")
    assert strict.exit_code == 1 and "data.strict=true" in strict.stderr


@pytest.mark.parametrize("dataset", ["breakhis", "camelyon17"])
def test_wrong_layout_is_one_line_and_non_zero(tmp_path: Path, dataset: str) -> None:
    (tmp_path / "empty").mkdir()
    result = _check("--dataset", dataset, "--root", str(tmp_path / "empty"),
                    "--set", f"data.cache-dir={tmp_path / 'cache'}")
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.stderr
    missing = _check("--dataset", dataset)
    assert missing.exit_code == 1 and "--root is required" in missing.stderr
