"""Registry of named local multi-center scenarios: config overrides on top of RunConfig defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.config import ConfigError, RunConfig


@dataclass(frozen=True)
class Scenario:
    """A named simulation: what it models and which config keys it sets."""

    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    paper: bool = False  # print the seed paper's figures beside the measured ones

    def config(self) -> RunConfig:
        """Defaults with this scenario's overrides, validated."""
        return RunConfig().override(self.overrides)


DEFAULT_SCENARIO = "synthetic-3sites"
# The recommended DP recipe (README "Differential privacy": chosen from simulations/bench_dp.py measurements).
DP_RECIPE: dict[str, Any] = {
    "data.train-per-site": 2000, "data.test-per-site": 500,
    "model.pretrained-path": "public", "model.trainable": "head",
    "train.batch-size": 256, "train.lr": 0.01, "train.local-epochs": 1, "federation.rounds": 5,
    "privacy.mode": "local", "privacy.target-epsilon": 8.0,
}

SCENARIOS: dict[str, Scenario] = {
    "synthetic-3sites": Scenario(
        "3 synthetic H&E hospitals (60 patients each on average, patient-disjoint splits; labs differ in stain, "
        "scanner and case mix 45/50/55 % malignant), tf_efficientnetv2_b0 hybrid at 64 px, FedAvg, 5 rounds of 1 local epoch",
        {},  # the RunConfig defaults are this scenario
    ),
    "breakhis-4sites": Scenario(
        "BreakHis 200X on disk (--data-root), binary, patients dealt to 4 simulated hospitals, "
        "patient-disjoint train/val/test inside each, 224 px, 10 rounds",
        {"data.dataset": "breakhis", "federation.num-sites": 4, "model.image-size": 224,
         "federation.rounds": 10, "train.num-workers": 2},
    ),
    "camelyon17-5centers": Scenario(
        "Camelyon17-WILDS on disk (--data-root): each of the 5 centers is a hospital, 96 px patches, "
        "at most 5,000 per site and split, 10 rounds",
        {"data.dataset": "camelyon17", "federation.num-sites": 5, "data.centers": "0,1,2,3,4",
         "model.image-size": 96, "data.max-per-site": 5000, "federation.rounds": 10, "train.num-workers": 2},
    ),
    "reproduce-paper": Scenario(
        "the seed paper's configuration on BreakHis on disk (--data-root): tf_efficientnetv2_s hybrid, "
        "200X, benign/malignant, 224 px, patient-disjoint splits, 4 hospitals, 20 rounds",
        {"data.dataset": "breakhis", "data.magnifications": "200X", "model.backbone": "tf_efficientnetv2_s",
         "model.num-classes": 2, "model.image-size": 224, "federation.num-sites": 4, "federation.rounds": 20,
         "train.num-workers": 2},
        paper=True,
    ),
    "synthetic-dp": Scenario(
        "differential privacy that learns: 3 synthetic hospitals × 2,000 training / 500 test patches (a "
        "Camelyon17-centre subsample; DP-SGD needs thousands of records per site), the hybrid pretrained on the "
        "public corpus (tissue types + nuclear morphometry; model.pretrained-path=public, cached), its head fine-tuned with local DP-SGD at "
        "ε = 8 (δ = 1e-5) per site over 5 rounds; frozen-backbone features cached per site",
        DP_RECIPE,
    ),
    "synthetic-tiny": Scenario(
        "smoke test: 2 synthetic hospitals, tiny test backbone at 32 px, 1 round, seconds",
        {
            "federation.num-sites": 2, "federation.rounds": 1, "model.backbone": "test_efficientnet",
            "model.image-size": 32, "model.token-dim": 16, "model.hidden-size": 16,
            "data.train-per-site": 32, "data.test-per-site": 16, "train.batch-size": 16,
        },
    ),
}


def get_scenario(name: str) -> Scenario:
    """Look a scenario up by name; unknown names are a ConfigError listing the choices."""
    if name not in SCENARIOS:
        raise ConfigError(f"unknown scenario '{name}' (choose from {', '.join(SCENARIOS)})")
    return SCENARIOS[name]
