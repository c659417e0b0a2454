"""A tiny PyTorch CNN (about 90 k parameters, like histofed's synthetic-tiny model) for the NVFlare peer benchmark."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """Three conv blocks and a linear head on 32 x 32 RGB inputs, two classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(96, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits B x 2."""
        return self.head(self.features(x).flatten(1))
