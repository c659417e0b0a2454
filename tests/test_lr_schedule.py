"""train.lr-schedule: the learning rate each optimizer step of train_local actually used."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from common.config import ConfigError


def _step_lrs(tiny_cfg, schedule: str, epochs: int = 2) -> list[float]:
    from common.datasets.registry import get_dataset
    from common.model import build_model
    from common.training import train_local

    cfg = tiny_cfg.override({"train.lr-schedule": schedule, "train.local-epochs": epochs})
    lrs: list[float] = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        torch.manual_seed(0)
        train_local(build_model(cfg.model), get_dataset("synthetic").load_split(cfg, 0, "train"), cfg.train,
                    torch.device("cpu"), seed=1)
    finally:
        hook.remove()
    return lrs


def test_constant_keeps_the_configured_rate(tiny_cfg) -> None:
    lrs = _step_lrs(tiny_cfg, "constant")
    assert len(lrs) >= 4 and set(lrs) == {tiny_cfg.train.lr}


def test_cosine_decays_from_the_rate_towards_zero_over_all_epochs(tiny_cfg) -> None:
    lrs = _step_lrs(tiny_cfg, "cosine")
    assert lrs[0] == pytest.approx(tiny_cfg.train.lr)
    assert all(b < a for a, b in zip(lrs, lrs[1:]))  # strictly down, across the epoch boundary too
    assert lrs[-1] < 0.2 * tiny_cfg.train.lr  # the last step is near the end of the half-cosine


def test_an_unknown_schedule_is_refused_by_name(tiny_cfg) -> None:
    with pytest.raises(ConfigError, match="lr-schedule|lr_schedule"):
        tiny_cfg.override({"train.lr-schedule": "step"})


@pytest.mark.parametrize("overrides, culprit", [
    ({"privacy.mode": "local"}, "privacy.mode"),
    ({"model.trainable": "classifier"}, "model.trainable"),
    ({"federation.strategy": "scaffold", "train.optimizer": "sgd", "train.momentum": 0.0}, "scaffold"),
])
def test_cosine_is_refused_where_its_loop_would_ignore_it(tiny_cfg, overrides, culprit) -> None:
    with pytest.raises(ConfigError, match=culprit):
        tiny_cfg.override({**overrides, "train.lr-schedule": "cosine"})
    tiny_cfg.override(overrides)  # the same settings at a constant rate are fine
