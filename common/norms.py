"""BatchNorm → GroupNorm conversion of a built model (model.norm=group; the DP model reuses it).

GroupNorm (Wu & He 2018) normalises each image on its own: no running statistics, nothing that depends
on which hospital's batches a site saw, so nothing in the normalisation to average across stain-shifted
sites. timm's BatchNormAct2d becomes GroupNormAct (GroupNorm → its dropout → its activation); a plain
BatchNorm2d becomes nn.GroupNorm. Affine weights are kept (e.g. from a pretrained file).
"""

from __future__ import annotations

import math

from timm.layers.norm_act import BatchNormAct2d
from torch import nn

MAX_NORM_GROUPS = 32  # GroupNorm groups: gcd(channels, 32) (Wu & He 2018 use 32)


class GroupNormAct(nn.Module):
    """GroupNorm → dropout → activation, the replacement of timm's BatchNormAct2d (no running statistics)."""

    def __init__(self, num_channels: int, *, eps: float, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(math.gcd(num_channels, MAX_NORM_GROUPS), num_channels, eps=eps, affine=True)
        self.drop = drop
        self.act = act

    def forward(self, x):  # B x C x H x W → same
        return self.act(self.drop(self.norm(x)))


def group_norm_from(bn: nn.BatchNorm2d) -> nn.Module:
    """GroupNorm(+act) keeping the BatchNorm's affine weights; statistics are dropped."""
    if isinstance(bn, BatchNormAct2d):
        new: nn.Module = GroupNormAct(bn.num_features, eps=bn.eps, drop=bn.drop, act=bn.act)
        norm = new.norm
    else:
        new = norm = nn.GroupNorm(math.gcd(bn.num_features, MAX_NORM_GROUPS), bn.num_features, eps=bn.eps)
    if bn.affine:
        norm.weight.data.copy_(bn.weight.data)
        norm.bias.data.copy_(bn.bias.data)
    return new


def to_group_norm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d (in place, recursively) by its GroupNorm counterpart; returns the model."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, group_norm_from(child))
        else:
            to_group_norm(child)
    return model
