"""FedBN / SiloBN: a site's normalization layers stay at the site (on its disk), are never sent and never averaged.

FedBN (Li et al. 2021) keeps BatchNorm local to handle feature shift between sites; SiloBN (Andreux et al.
2020, multi-centric histopathology) keeps its statistics local, which also keeps per-hospital image
statistics from travelling. The site loads its own norm layers over the global model before it trains or
evaluates, and sends the norm layers back exactly as it received them: the server's average of identical
values leaves them unchanged, and its key/shape checks still see every weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.config import RunConfig
from common.privacy.ledger import ledger_path
from common.weights import read_state_dict, save_state_dict

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm)


def norm_keys(model: nn.Module) -> list[str]:
    """state_dict keys of the model's normalization layers (BatchNorm weights, statistics and counters; GroupNorm)."""
    keys: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            keys += [f"{name}.{key}" if name else key for key in module.state_dict()]
    return keys


def local_norm_path(cfg: RunConfig, site: str, node_config: Mapping[str, Any] | None = None) -> Path:
    """The site's norm-layer file, beside its privacy ledger."""
    ledger = ledger_path(cfg, site, node_config)
    return ledger.with_name(ledger.stem + ".norm.safetensors")


def scaffold_state_path(cfg: RunConfig, site: str, node_config: Mapping[str, Any] | None = None) -> Path:
    """The site's SCAFFOLD control variate c_i (common.scaffold), beside its norm layers and privacy ledger."""
    ledger = ledger_path(cfg, site, node_config)
    return ledger.with_name(ledger.stem + ".scaffold.safetensors")


def restore_local_norm(model: nn.Module, path: Path) -> bool:
    """Load the site's own norm layers over the global ones (False on the site's first round: nothing kept yet)."""
    if not path.is_file():
        return False
    state = read_state_dict(path)
    keys = norm_keys(model)
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"local norm layers in {path} do not fit the model (first missing '{missing[0]}')")
    own = model.state_dict()
    model.load_state_dict({**own, **{k: state[k].to(own[k].dtype) for k in keys}}, strict=True)
    return True


def keep_local_norm(
    model: nn.Module, path: Path, reply: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Save the trained norm layers at the site; return the reply with those keys exactly as the server sent them."""
    keys = norm_keys(model)
    own = model.state_dict()
    save_state_dict({k: own[k] for k in keys}, path)
    return {k: (received[k].to(v.dtype) if k in keys else v) for k, v in reply.items()}
