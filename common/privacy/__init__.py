"""Differential privacy for histofed: local DP-SGD per site (Opacus) with a persistent ledger, central-DP settings, the report.

Public API (everything else is private to this package):
- `build_model_for(model_cfg, privacy_cfg)`: THE builder server and clients use: the plain model when
  privacy.mode=off, else its DP-compatible conversion (GroupNorm, DPGRU, fast grouped convs).
- `preflight(cfg, num_examples=...)`: every check possible before training (clear ConfigError naming the key).
- `train_private(*, model, data, cfg, device, seed, site, ledger_file, ...)`: one site's DP-SGD round with its
  budget check and ledger update; `PrivateTrainResult.declined` says why a site refused.
- `PrivacyMonitor`: the server's per-site ε per round, budget policy and privacy.json.
Opacus is imported only when privacy is on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from common.config import ModelConfig, PrivacyConfig, RunConfig
from common.privacy.accounting import CentralPlan, LocalPlan, epsilon, plan_central, plan_local
from common.privacy.ledger import LedgerError, PrivacyLedger, ledger_path
from common.privacy.report import (
    DECLINED, PRIVACY_FILE, PrivacyBudgetStop, PrivacyMonitor, decode_metrics, encode_metrics,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from common.datasets.splits import SiteSplit
    from common.privacy.trainer import PrivateTrainResult

__all__ = [
    "CentralPlan", "DECLINED", "LedgerError", "LocalPlan", "PRIVACY_FILE",
    "PrivacyBudgetStop", "PrivacyLedger", "PrivacyMonitor", "build_model_for", "decode_metrics",
    "encode_metrics", "epsilon", "is_central", "ledger_path", "plan_central", "plan_local", "preflight",
    "train_private",
]

def is_central(privacy: PrivacyConfig) -> bool:
    """Central DP through one of Flower's strategy wrappers."""
    return privacy.mode.startswith("central")


def build_model_for(model_cfg: ModelConfig, privacy_cfg: PrivacyConfig, *, load_pretrained: bool = True) -> nn.Module:
    """The model of this run, identical on server and clients: plain, or DP-compatible whenever privacy is on."""
    from common.model import build_model

    if privacy_cfg.mode == "off":
        return build_model(model_cfg, load_pretrained=load_pretrained)
    from common.privacy.dp_model import check_dp_architecture, make_dp_compatible

    check_dp_architecture(model_cfg)
    model = build_model(model_cfg, load_pretrained=load_pretrained)
    return make_dp_compatible(model, fast_depthwise=privacy_cfg.fast_depthwise, what=f"backbone '{model_cfg.backbone}'")


def preflight(cfg: RunConfig, *, num_examples: int | None = None) -> None:
    """Fail before any training: architecture, δ below 1/N, σ or a reachable ε target (local: for N examples)."""
    if cfg.privacy.mode == "off":
        return
    from common.privacy.dp_model import check_dp_architecture

    check_dp_architecture(cfg.model)
    if is_central(cfg.privacy):
        plan_central(cfg)
    elif num_examples is not None:
        plan_local(cfg, num_examples)


def train_private(
    *, model: nn.Module, data: SiteSplit, cfg: RunConfig, device: torch.device, seed: int, site: str,
    ledger_file: Path, server_round: int = 0, run_id: int | str = "",
) -> PrivateTrainResult:
    """One round of local DP-SGD (Opacus) on a site, within the budget its ledger allows (see trainer.train_private)."""
    from common.privacy import trainer

    return trainer.train_private(model, data, cfg, device, seed=seed, site=site, ledger_file=ledger_file,
                                 server_round=server_round, run_id=run_id)
