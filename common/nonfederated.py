"""Pooled (centralised) and local-only training with the clients' own loop, and evaluation on any sites."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from common.config import RunConfig
from common.datasets.registry import get_dataset, load_site
from common.datasets.splits import SiteSplit
from common.metrics import pooled_report
from common.model import build_model
from common.seeds import pooled_seed
from common.training import evaluate, prepare, select_device, train_local


def train_on_sites(cfg: RunConfig, sites: Sequence[int]) -> nn.Module:
    """Train one model on the union of these sites' training splits for the federation's whole budget.

    Budget = federation.rounds x train.local-epochs passes over the data, as each federated site gets.
    """
    data = ConcatDataset([load_site(cfg, i, "train") for i in sites])
    return train_on_data(cfg, data, seed=pooled_seed(cfg.train.seed, sites))


def train_on_data(cfg: RunConfig, data: Dataset, *, seed: int) -> nn.Module:
    """Train a fresh model (the ServerApp's initial weights for train.seed) on any dataset, same loop and budget."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)  # same initial weights as the ServerApp's for this seed
    device = select_device(cfg.train.device)
    model = prepare(build_model(cfg.model), device, channels_last=cfg.train.channels_last)
    budget = cfg.train.model_copy(update={"local_epochs": cfg.federation.rounds * cfg.train.local_epochs})
    train_local(model, data, budget, device, seed=seed)
    return model


def evaluate_on_sites(model: nn.Module, cfg: RunConfig, sites: Sequence[int], split: str = "test") -> dict[str, Any]:
    """Pooled global and per-site metrics of one model on these sites' test splits."""
    names = get_dataset(cfg.data.dataset).site_names(cfg)
    return evaluate_splits(model, cfg, {names[i]: load_site(cfg, i, split) for i in sites})


def evaluate_splits(model: nn.Module, cfg: RunConfig, splits: Mapping[str, SiteSplit]) -> dict[str, Any]:
    """Pooled global and per-split metrics of one model on named splits."""
    device = next(model.parameters()).device
    results = {name: evaluate(model, split, device, amp=cfg.train.amp, num_workers=cfg.train.num_workers)
               for name, split in splits.items()}
    return pooled_report(results)
