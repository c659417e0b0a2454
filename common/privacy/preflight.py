"""Every differential-privacy check possible before any training (one ConfigError line naming the key)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.errors import ConfigError
from common.privacy.accounting import CentralPlan, plan_central, plan_local

if TYPE_CHECKING:
    from common.config import ModelConfig, RunConfig


def preflight(cfg: RunConfig, *, num_examples: int | None = None) -> CentralPlan | None:
    """Architecture, δ below 1/N, σ or a reachable ε target (local: for N examples); returns the central plan."""
    spec = cfg.privacy.spec
    if not spec.private:
        return None
    check_dp_architecture(cfg.model)
    if spec.central:
        return plan_central(cfg)
    if num_examples is not None:
        plan_local(cfg, num_examples)
    return None


def check_dp_architecture(cfg: ModelConfig) -> None:
    """DP-SGD is built for the hybrid; the paper's baselines keep BatchNorm layers histofed does not convert."""
    if cfg.architecture != "hybrid":
        raise ConfigError(
            f"invalid value for 'model.architecture': differential privacy (privacy.mode) supports the hybrid "
            f"only; the baseline '{cfg.architecture}' is a BatchNorm model that histofed does not convert "
            f"(got '{cfg.architecture}')"
        )
