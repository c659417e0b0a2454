"""ONNX export: onnxruntime reproduces torch (GRU and attention included) within 1e-4; the card travels as metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from common.card import CARD_KEY, card_for_run, load_model, write_model
from common.config import RunConfig
from common.onnx_export import TOLERANCE, export_onnx, read_onnx_card
from common.model import build_model_for
from common.training import to_input


@pytest.mark.parametrize("overrides", [
    {}, {"privacy.mode": "local", "model.num-classes": 8}, {"model.architecture": "mobilenetv3", "model.image-size": 32},
], ids=["hybrid", "dp-hybrid-8-classes", "baseline"])
def test_onnxruntime_matches_torch_and_carries_the_card(tmp_path: Path, tiny_cfg: RunConfig, overrides: dict) -> None:
    # Prepare: a carded model file, rebuilt from its card as `flower-client export` does
    cfg = tiny_cfg.override({"model.image-size": 64, **overrides})
    torch.manual_seed(1)
    model_file = write_model(tmp_path / "model.safetensors", build_model_for(cfg.model, cfg.privacy).state_dict(),
                             card_for_run(cfg, data_kind="synthetic"))
    model, card = load_model(model_file)

    # Execute
    diff = export_onnx(model, card, tmp_path / "model.onnx")

    # Assert: parity on fresh random pixels of another batch size, and the outputs' meaning
    assert diff <= TOLERANCE
    size = cfg.model.image_size
    pixels = np.random.default_rng(5).uniform(0, 255, (5, size, size, 3)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"pixels": pixels})
    with torch.no_grad():
        x = to_input(torch.from_numpy(pixels.copy()), torch.device("cpu"))  # the graph normalises as training does
        want = torch.softmax(model(x), dim=1).numpy()
    assert np.abs(outputs[0] - want).max() <= TOLERANCE and np.allclose(outputs[0].sum(axis=1), 1, atol=1e-5)
    if cfg.model.architecture == "hybrid":
        grid = size // 32
        assert outputs[1].shape == (5, grid, grid) and np.allclose(outputs[1].sum(axis=(1, 2)), 1, atol=1e-5)
    assert len(outputs) == (2 if cfg.model.architecture == "hybrid" else 1)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert props["model-data"] == "synthetic" and CARD_KEY in props
    assert read_onnx_card(tmp_path / "model.onnx").model == cfg.model
