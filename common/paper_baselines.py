"""The seed paper's baselines (AlexNet, DenseNet-121, MobileNetV3, EfficientNet-B0) behind the hybrid's interface."""

from __future__ import annotations

import timm
import torch
import torchvision
from torch import nn

from common.backbones import ARCHITECTURES
from common.config import ModelConfig


class Baseline(nn.Module):
    """A plain image classifier with the hybrid's call signature (no attention map)."""

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> torch.Tensor:
        """Logits B x K; return_attention is not available for baselines."""
        if return_attention:
            raise ValueError("attention maps exist for the hybrid model only")
        return self.net(x)


_BUILDERS = {
    "timm": lambda name, k: timm.create_model(name, pretrained=False, num_classes=k),
    "torchvision": lambda name, k: getattr(torchvision.models, name)(weights=None, num_classes=k),
}


def build_baseline(cfg: ModelConfig) -> Baseline:
    """Build a baseline from scratch (weights never downloaded)."""
    spec = ARCHITECTURES[cfg.architecture]
    return Baseline(_BUILDERS[spec.source](spec.name, cfg.num_classes), cfg.num_classes)
