"""The fast grouped/depthwise-conv grad sampler: exact per-sample gradients, registered for histofed's classes only."""

from __future__ import annotations

import warnings

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from common.model import build_model_for
from common.privacy.grad_sampler import FastConv2d, FastConv2dSame, grouped_conv_grad_sample, use_fast_convs

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")

CONVS = {  # (in, out, kernel, stride, groups, padding, padding_mode, dilation)
    "depthwise-3x3-s1-zeros": (16, 16, 3, 1, 16, 1, "zeros", 1),
    "depthwise-x2-5x5-s2-reflect": (8, 16, 5, 2, 8, 2, "reflect", 1),
    "depthwise-3x3-same-circular": (12, 12, 3, 1, 12, "same", "circular", 1),
    "depthwise-3x3-valid": (7, 7, 3, 1, 7, "valid", "zeros", 1),
    "grouped-g4-3x3-s2-replicate": (8, 12, 3, 2, 4, 1, "replicate", 1),
    "grouped-g2-3x2-s21-dilated": (6, 4, (3, 2), (2, 1), 2, (2, 1), "zeros", 2),
    "dense-1x1": (5, 9, 1, 1, 1, 0, "zeros", 1),
    "dense-3x3-s2": (3, 8, 3, 2, 1, 1, "zeros", 1),
    "grouped-1x1-g3": (6, 9, 1, 1, 3, 0, "zeros", 1),
}


def _conv(spec: tuple, same: bool) -> nn.Conv2d:
    cin, cout, k, s, g, pad, mode, dil = spec
    if same:  # timm's TensorFlow 'SAME' (dynamic, asymmetric padding), as in tf_efficientnetv2_* stride-2 convs
        return Conv2dSame(cin, cout, k, stride=s, groups=g, dilation=dil)
    return nn.Conv2d(cin, cout, k, stride=s, groups=g, padding=pad, padding_mode=mode, dilation=dil)


def _exact(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Per-sample gradients the slow way: one backward pass per sample (batch of 1)."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        rows.append([p.grad.detach().clone() for p in params])
    return [torch.stack([r[j] for r in rows]) for j in range(len(params))]


def _opacus(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    gsm = GradSampleModule(model, loss_reduction="sum")
    try:
        nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
        return [p.grad_sample.detach().clone() for p in params]
    finally:
        gsm.cleanup()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("same", [False, True], ids=["torch-padding", "tf-same"])
@pytest.mark.parametrize("name", list(CONVS))
def test_fast_sampler_matches_exact_batch_of_one_gradients(name: str, same: bool, channels_last: bool) -> None:
    # Prepare
    torch.manual_seed(0)
    conv = _conv(CONVS[name], same)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(5, conv.in_channels, 11, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (5,))
    model(x)
    params = list(conv.parameters())
    exact = _exact(model, x, y, params)
    # Execute
    assert use_fast_convs(model) == 1 and type(conv) in (FastConv2d, FastConv2dSame)
    fast = _opacus(model, x, y, params)
    # Assert
    for got, want in zip(fast, exact):
        assert got.shape == want.shape and _rel(got, want) <= 1e-4


def test_registration_is_scoped_to_histofeds_own_conv_classes() -> None:
    samplers = GradSampleHooks.GRAD_SAMPLERS
    assert samplers[FastConv2d] is grouped_conv_grad_sample and samplers[FastConv2dSame] is grouped_conv_grad_sample
    assert samplers[nn.Conv2d] is compute_conv_grad_sample  # Opacus's own, untouched
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.GroupNorm(2, 4), nn.Linear(3, 3), nn.Conv1d(4, 4, 1))
    before = model.state_dict()
    assert use_fast_convs(model) == 1
    assert [type(m) for m in model] == [FastConv2d, nn.GroupNorm, nn.Linear, nn.Conv1d]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fast_and_stock_samplers_agree_on_the_tiny_dp_model(tiny_cfg) -> None:
    # Prepare: the whole DP-compatible hybrid (GroupNorm, DPGRU, grouped convs), NCHW, dropout off, float64
    cfg = tiny_cfg.override({"privacy.mode": "local", "model.dropout": 0.0})
    torch.manual_seed(0)
    fast_model = build_model_for(cfg.model, cfg.privacy)
    stock_model = build_model_for(cfg.model, cfg.privacy.model_copy(update={"fast_depthwise": False}))
    stock_model.load_state_dict(fast_model.state_dict())
    fast_model, stock_model = fast_model.double(), stock_model.double()  # float64: isolate the samplers from rounding
    assert any(isinstance(m, FastConv2d) and m.groups > 1 for m in fast_model.modules())
    assert not any(isinstance(m, (FastConv2d, FastConv2dSame)) for m in stock_model.modules())
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Execute
        fast = _opacus(fast_model, x, y, list(fast_model.parameters()))
        stock = _opacus(stock_model, x, y, list(stock_model.parameters()))
        exact = _exact(fast_model, x, y, list(fast_model.parameters()))
    # Assert: per parameter tensor, against exact batch-of-1 gradients and against Opacus's own sampler
    worst = max(_rel(f, e) for f, e in zip(fast, exact) if e.norm() > 1e-6)
    assert worst <= 1e-4
    assert max(_rel(f, s) for f, s in zip(fast, stock) if s.norm() > 1e-6) <= 1e-4
