"""AdaBN: only normalisation statistics change, they become the new images' statistics, momentum is restored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.adabn import NoNormStatistics, adapt_batchnorm, batchnorm_layers
from common.datasets.splits import ArraySplit
from common.model import build_model


def _images(n: int, shift: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 160, (n, 32, 32, 3)) + shift, 0, 255).astype(np.uint8)


def test_only_normalisation_statistics_change(tiny_cfg) -> None:
    model = build_model(tiny_cfg.model)
    model.train()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momenta = [m.momentum for m in batchnorm_layers(model)]

    used = adapt_batchnorm(model, ArraySplit(_images(20, 60), np.zeros(20, dtype=int)), batch_size=8)

    assert used == 20
    assert all(torch.equal(params[k], v) for k, v in model.named_parameters())  # bit-identical weights
    stats = ("running_mean", "running_var", "num_batches_tracked")
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith(stats) for k in changed)
    assert all(not torch.equal(after[k], before[k]) for k in after if k.endswith("running_mean"))
    assert [m.momentum for m in batchnorm_layers(model)] == momenta and model.training


def test_statistics_are_the_new_images_cumulative_average() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.3))
    model.eval()
    x = torch.randn(12, 3, 5, 5) * 3 + 2
    adapt_batchnorm(model, [x[:6], x[6:]])  # float input is taken as it is
    features = model[0](x).detach()
    batch_means = torch.stack([features[:6].mean((0, 2, 3)), features[6:].mean((0, 2, 3))])
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, batch_means.mean(0))  # every batch counts equally
    assert int(bn.num_batches_tracked) == 2 and bn.momentum == 0.3 and not model.training


def test_adabn_is_deterministic_and_ignores_labels(tiny_cfg) -> None:
    images = _images(16, 30, seed=1)
    states = []
    for labels in (np.zeros(16, dtype=int), np.ones(16, dtype=int)):
        torch.manual_seed(0)
        model = build_model(tiny_cfg.model)
        adapt_batchnorm(model, ArraySplit(images, labels), batch_size=8)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    torch.manual_seed(0)
    model = build_model(tiny_cfg.model)
    adapt_batchnorm(model, images, batch_size=8)  # raw uint8 images, as the predict command holds them
    assert all(torch.equal(states[0][k], model.state_dict()[k]) for k in states[0])


def test_a_model_without_batchnorm_statistics_is_refused(tiny_cfg) -> None:
    from common.model import build_model_for

    dp_model = build_model_for(tiny_cfg.model, tiny_cfg.override({"privacy.mode": "local"}).privacy, load_pretrained=False)
    with pytest.raises(NoNormStatistics, match="no BatchNorm running statistics"):
        adapt_batchnorm(dp_model, _images(4, 0))


def test_no_usable_image_leaves_the_statistics_as_they_were(tiny_cfg) -> None:
    model = build_model(tiny_cfg.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no batch of 2"):
        adapt_batchnorm(model, _images(1, 0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_group_norm_hybrid_has_no_running_statistics_and_trains(tiny_cfg) -> None:
    from common.adabn import has_norm_statistics

    cfg = tiny_cfg.override({"model.norm": "group"})
    model = build_model(cfg.model)
    assert not has_norm_statistics(model) and not list(model.buffers())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters())
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="model.norm=group is supported for the hybrid only"):
        tiny_cfg.override({"model.norm": "group", "model.architecture": "alexnet", "model.image-size": 64})
