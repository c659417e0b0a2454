"""The hybrid model: shapes, attention, gradients, local-only pretrained weights."""

from __future__ import annotations

import pytest
import torch

from common.config import ModelConfig, RunConfig

from common.errors import ConfigError
from common.model import build_model
from common.weights import WeightMismatchError, load_weights, save_state_dict


@pytest.mark.parametrize("backbone", ["tf_efficientnetv2_b0", "efficientnetv2_rw_t", "test_efficientnet"])
@pytest.mark.parametrize("num_classes", [2, 8])
def test_output_and_attention_shapes(backbone: str, num_classes: int) -> None:
    cfg = ModelConfig(backbone=backbone, num_classes=num_classes, image_size=64, hidden_size=16, token_dim=8)
    model = build_model(cfg).eval()
    x = torch.randn(3, 3, 64, 64)
    logits, attn = model(x, return_attention=True)
    assert logits.shape == (3, num_classes)
    assert attn.shape == (3, 2, 2)  # 64 px / stride 32 → a 2 x 2 token grid
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.flatten(1).sum(dim=1), torch.ones(3))


def test_non_square_input_gives_matching_attention_grid() -> None:
    model = build_model(ModelConfig(backbone="test_efficientnet", hidden_size=8, token_dim=8)).eval()
    _, attn = model(torch.randn(2, 3, 96, 64), return_attention=True)
    assert attn.shape == (2, 3, 2)


def test_unidirectional_gru_and_plain_forward() -> None:
    cfg = ModelConfig(backbone="test_efficientnet", bidirectional=False, hidden_size=8, token_dim=8)
    model = build_model(cfg)
    assert model.classifier.in_features == 8
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_backward_reaches_the_backbone() -> None:
    model = build_model(ModelConfig(backbone="tf_efficientnetv2_b0", hidden_size=16, token_dim=8))
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1]))
    loss.backward()
    stem = model.backbone.conv_stem.weight.grad
    assert stem is not None and stem.abs().sum() > 0
    assert model.gru.weight_ih_l0.grad.abs().sum() > 0


def test_pretrained_weights_come_from_a_local_file(tmp_path) -> None:
    source = build_model(ModelConfig(backbone="test_efficientnet"))
    path = tmp_path / "backbone.safetensors"
    save_state_dict(source.backbone.state_dict(), path)
    cfg = ModelConfig(backbone="test_efficientnet", pretrained=True, pretrained_path=str(path))
    loaded = build_model(cfg)
    for key, value in source.backbone.state_dict().items():
        torch.testing.assert_close(loaded.backbone.state_dict()[key], value)
    fresh = build_model(ModelConfig(backbone="test_efficientnet"))
    assert not torch.equal(fresh.backbone.conv_stem.weight, loaded.backbone.conv_stem.weight)


def test_pretrained_torch_file_is_read_weights_only(tmp_path) -> None:
    source = build_model(ModelConfig(backbone="test_efficientnet"))
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": source.backbone.state_dict()}, path)
    loaded = build_model(ModelConfig(backbone="test_efficientnet", pretrained_path=str(path)))
    torch.testing.assert_close(loaded.backbone.conv_stem.weight, source.backbone.conv_stem.weight)


def test_pretrained_without_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="pretrained-path"):
        RunConfig().override({"model.pretrained": "true"})


def test_pretrained_file_for_another_backbone_is_rejected(tmp_path) -> None:
    other = build_model(ModelConfig(backbone="test_efficientnet"))
    path = tmp_path / "wrong.safetensors"
    save_state_dict(other.backbone.state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit backbone|shape mismatch"):
        build_model(ModelConfig(backbone="tf_efficientnetv2_b0", pretrained_path=str(path)))


def test_missing_pretrained_file_names_it(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_model(ModelConfig(backbone="test_efficientnet", pretrained_path=str(tmp_path / "nope.safetensors")))


def test_weights_load_by_key_and_mismatch_is_an_error() -> None:
    model = build_model(ModelConfig(backbone="test_efficientnet"))
    state = model.state_dict()
    load_weights(model, state)
    renamed = {("x." + k if i == 0 else k): v for i, (k, v) in enumerate(state.items())}
    with pytest.raises(WeightMismatchError, match="missing"):
        load_weights(model, renamed)
    wider = build_model(ModelConfig(backbone="test_efficientnet", hidden_size=32)).state_dict()
    with pytest.raises(WeightMismatchError, match="shape mismatch"):
        load_weights(model, wider)
