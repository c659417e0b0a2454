"""Pooled vs local vs federated: every cell of the table, seeds that matter, the paper's baselines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.paper_baselines import Baseline
from common.config import ModelConfig
from common.metrics import METRIC_NAMES
from common.model import build_model
from simulations.compare import CompareOptions, run_compare
from simulations.planning import RunOptions

FLOWER_SIM = str(Path(sys.executable).parent / "flower-sim")
TINY_SETS = ("model.image-size=32", "model.token-dim=8", "model.hidden-size=8", "data.train-per-site=16",
             "data.test-per-site=8", "train.batch-size=8")


def _compare(tmp_path: Path, name: str, seeds: tuple[int, ...], **kw) -> dict:
    options = CompareOptions(RunOptions("synthetic-tiny", sites=3, sets=kw.pop("sets", TINY_SETS)), seeds=seeds,
                             modes=kw.pop("modes", ("pooled", "local")), out_dir=tmp_path / name, **kw)
    return run_compare(options, log=lambda _: None)


def _cell(summary: dict, mode: str, scope: str, model: str = "hybrid") -> dict:
    return next(r for r in summary["rows"] if r["mode"] == mode and r["scope"] == scope and r["model"] == model)


def test_every_cell_and_the_held_out_hospital(tmp_path: Path) -> None:
    summary = _compare(tmp_path, "a", (0, 1), holdout=2)
    assert summary["holdout"] == "synthetic-hospital-2" and summary["data-kind"] == "synthetic"
    for mode in ("pooled", "local"):
        for scope in ("global", "synthetic-hospital-0", "synthetic-hospital-1", "held-out"):
            row = _cell(summary, mode, scope)
            assert row["seeds"] == 2
            for name in METRIC_NAMES:
                assert row[name]["mean"] is not None or name == "auc"
    saved = json.loads((tmp_path / "a" / "compare.json").read_text())
    matrix = saved["runs"]["hybrid"]["local"][0]["cross-site-accuracy"]
    assert sorted(matrix) == ["synthetic-hospital-0", "synthetic-hospital-1"]  # local model i on site j
    assert all(sorted(row) == sorted(matrix) for row in matrix.values())
    csv_lines = (tmp_path / "a" / "compare.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(summary["rows"]) and csv_lines[0].startswith("data-kind,model,mode,scope")


def test_same_seed_same_result_other_seed_other_result(tmp_path: Path) -> None:
    first = _compare(tmp_path, "s0", (0,), modes=("pooled",))
    again = _compare(tmp_path, "s0-again", (0,), modes=("pooled",))
    other = _compare(tmp_path, "s1", (1,), modes=("pooled",))
    loss = lambda s: json.loads((Path(s["out-dir"]) / "compare.json").read_text())["runs"]["hybrid"]["pooled"][0]["train-sites"]["global"]["loss"]  # noqa: E731
    assert loss(first) == loss(again)
    assert loss(first) != loss(other)


@pytest.mark.parametrize("architecture", ["alexnet", "densenet121", "mobilenetv3", "efficientnet_b0"])
def test_each_baseline_builds_and_trains_one_step(architecture: str) -> None:
    model = build_model(ModelConfig(architecture=architecture, image_size=64))
    assert isinstance(model, Baseline) and model.num_classes == 2
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1]))
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="hybrid model only"):
        model(torch.randn(1, 3, 64, 64), return_attention=True)


def test_baselines_are_compared_in_one_run(tmp_path: Path) -> None:
    models = ("hybrid", "alexnet", "densenet121", "mobilenetv3", "efficientnet_b0")
    sets = tuple(s for s in TINY_SETS if not s.startswith("model.image-size")) + ("model.image-size=64",)
    summary = _compare(tmp_path, "b", (0,), models=models, modes=("pooled",), sets=sets)
    assert {r["model"] for r in summary["rows"]} == set(models)


@pytest.mark.slow
def test_compare_command_runs_federated_through_flower(tmp_path: Path) -> None:
    result = subprocess.run(
        [FLOWER_SIM, "compare", "synthetic-tiny", "--seeds", "2", "--sites", "3", "--holdout", "0",
         "--out-dir", str(tmp_path / "cmp")], capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())["summary"]
    modes = {(r["mode"], r["scope"]) for r in summary["rows"]}
    for mode in ("pooled", "local", "federated"):
        assert (mode, "global") in modes and (mode, "held-out") in modes
    assert "SYNTHETIC data, 2 seed(s), held-out hospital: synthetic-hospital-0" in result.stdout
    fed = json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"]["hybrid"]["federated"]
    assert fed[0]["train-sites"]["global"]["loss"] != fed[1]["train-sites"]["global"]["loss"]
