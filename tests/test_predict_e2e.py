"""End to end (slow): a tiny federation through Flower writes a carded model; a slide is predicted from its run dir."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.cli import app
from common.card import read_card
from common.slide_fixture import SlideSpec, write_slide

FLOWER_SIM = str(Path(sys.executable).parent / "flower-sim")
pytestmark = pytest.mark.slow


def test_a_federated_model_predicts_a_slide_from_its_run_directory(tmp_path: Path) -> None:
    # Prepare: one round of the synthetic-tiny federation (2 hospitals)
    run = tmp_path / "run"
    result = subprocess.run([FLOWER_SIM, "run", "synthetic-tiny", "--run-dir", str(run), "--no-report"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    card, checkpoint = read_card(run), read_card(run / "checkpoint.safetensors")
    assert card.data_kind == "synthetic" and card.rounds == 1 and card.metrics_round == 1
    assert sorted(card.sites) == ["synthetic-hospital-0", "synthetic-hospital-1"]
    assert all(s.train_images == 32 and s.test_images == 16 for s in card.sites.values())
    assert 0.0 <= card.metrics["accuracy"] <= 1.0 and card.model.backbone == "test_efficientnet"
    assert checkpoint.rounds == 1 and checkpoint.model == card.model
    slide = write_slide(tmp_path / "slide.tif", SlideSpec(4096, 4096, tissue=(1024, 1024, 3072, 3072),
                                                          region=(1024, 1024, 2048, 2048), mpp=0.25, levels=4))

    # Execute: the model card alone tells predict how to rebuild the model (32 px input, 2 µm/px asked)
    out = tmp_path / "out"
    predicted = CliRunner().invoke(app, ["predict", "--model", str(run), "--slide", str(slide), "--out", str(out),
                                         "--mpp", "2.0"])

    # Assert
    assert predicted.exit_code == 0, predicted.output
    tiles = (2048 // 256) ** 2  # 32 px at 2 µm/px = 256 level-0 px
    assert len((out / "tiles.csv").read_text().splitlines()) == 1 + tiles
    assert json.loads((out / "summary.json").read_text())["model-data"] == "synthetic"
    assert "SYNTHETIC" in predicted.stdout and f"{tiles} tissue tile(s)" in predicted.stdout
    exported = CliRunner().invoke(app, ["export", "--model", str(run), "--onnx", str(tmp_path / "model.onnx")])
    assert exported.exit_code == 0, exported.output
