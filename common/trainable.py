"""What trains at the sites (`model.trainable`): frozen parts, frozen BatchNorm statistics, and the frozen prefix / trainable tail split.

Fine-tuning a pretrained hybrid trains only a part of it (Tramèr & Boneh 2021; De et al. 2022). Frozen
weights get requires_grad=False and their modules stay in eval mode (`HybridEffNetGRU.frozen_eval`), so
frozen BatchNorm layers only apply their running statistics. Opacus validates and hooks only modules with
trainable parameters, so frozen BatchNorm and a frozen nn.GRU are accepted under DP as they are (measured,
Opacus 1.6: `ModuleValidator.validate` and `make_private` iterate `trainable_modules`). A BatchNorm whose
affine weights train (`head+norm`, `last-stage`) is folded into `FrozenNormAct`: the same function as the
eval-mode BatchNorm, x·γ/√(σ²+ε) + (β − μ·γ/√(σ²+ε)), as a per-channel affine with no statistics, in the
plain and the DP model alike, so the non-DP recipe is exactly the DP recipe without clipping and noise.

When the frozen part is a prefix of the forward pass (`classifier`, `head`, `last-stage`), `Split` runs it
once (`prefix`, no autograd) and trains only the tail; common/feature_cache.py stores the prefix outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

from common.backbones import TRAINABLE_PARTS
from common.errors import ConfigError

HEAD_MODULES = ("proj", "token_norm", "gru", "attention", "classifier")


class ChannelAffine(nn.Module):
    """y = x·weight[c] + bias[c] on B x C x H x W (a BatchNorm with frozen statistics, folded)."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B x C x H x W → same
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


class FrozenNormAct(nn.Module):
    """Folded BatchNorm (statistics frozen) → dropout → activation: timm's BatchNormAct2d in eval mode, trainable affine."""

    def __init__(self, num_channels: int, *, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.affine = ChannelAffine(num_channels)
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B x C x H x W → same
        return self.act(self.drop(self.affine(x)))


def fold_batchnorm(bn: nn.BatchNorm2d) -> nn.Module:
    """The eval-mode function of a BatchNorm (its running statistics and affine weights) as a per-channel affine."""
    with torch.no_grad():
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        gamma = bn.weight.double() if bn.affine else torch.ones_like(scale)
        beta = bn.bias.double() if bn.affine else torch.zeros_like(scale)
        weight, bias = gamma * scale, beta - bn.running_mean.double() * gamma * scale
    if isinstance(bn, BatchNormAct2d):
        new: nn.Module = FrozenNormAct(bn.num_features, drop=bn.drop, act=bn.act)
        affine = new.affine
    else:
        new = affine = ChannelAffine(bn.num_features)
    with torch.no_grad():
        affine.weight.copy_(weight.to(affine.weight.dtype))
        affine.bias.copy_(bias.to(affine.bias.dtype))
    return new


def _norm_modules(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm,
                                                                          nn.LayerNorm, ChannelAffine))]


def last_stage(model: nn.Module) -> str:
    """Name of the backbone's deepest stage (the block group that yields the last feature map)."""
    backbone = model.backbone
    blocks = getattr(backbone, "blocks", None)
    stage_idx = getattr(backbone, "_stage_out_idx", None)
    if not isinstance(blocks, nn.Sequential) or stage_idx is None or len(blocks) not in stage_idx:
        raise ConfigError(f"invalid value for 'model.trainable': 'last-stage' needs a timm EfficientNet feature backbone "
                          f"whose last block group gives the last feature (got {type(backbone).__name__})")
    return f"backbone.blocks.{len(blocks) - 1}"


def _trainable_prefixes(model: nn.Module, part: str) -> tuple[str, ...]:
    """Module names whose parameters train for a part ('' = every module)."""
    if part == "all":
        return ("",)
    if part == "classifier":
        return ("classifier",)
    if part == "head":
        return HEAD_MODULES
    if part == "head+norm":
        return HEAD_MODULES + tuple(f"backbone.{n}" for n in _norm_modules(model.backbone) if n)
    if part == "last-stage":
        return HEAD_MODULES + (last_stage(model),)
    raise ConfigError(f"invalid value for 'model.trainable': unknown part '{part}' (choose from {', '.join(TRAINABLE_PARTS)})")


def _inside(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def apply_trainable(model: nn.Module, part: str) -> nn.Module:
    """Freeze everything outside `part` (requires_grad=False, eval mode), folding BatchNorms whose weights train; in place."""
    if part == "all":
        model.frozen_eval = ()
        return model
    prefixes = _trainable_prefixes(model, part)
    for name, module in list(model.named_modules()):  # BatchNorm that trains with frozen statistics → folded affine
        if isinstance(module, nn.BatchNorm2d) and _inside(name, prefixes):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, fold_batchnorm(module))
    for name, param in model.named_parameters():
        param.requires_grad_(_inside(name.rpartition(".")[0], prefixes))
    model.frozen_eval = _frozen_tops(model)
    return model


def _frozen_tops(model: nn.Module) -> tuple[str, ...]:
    """The outermost submodules that have parameters and none of them trainable (kept in eval mode)."""
    tops: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(t + ".") for t in tops):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            tops.append(name)
    return tuple(tops)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters, in state_dict order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def update_keys(model: nn.Module, part: str) -> list[str]:
    """state_dict keys a site sends back: all of them for 'all' (BatchNorm statistics change), else the trainable weights.

    By identity, not by name: Opacus's DPGRU lists each weight under two state_dict keys (`gru.weight_ih_l0` and
    `gru.l0.ih.weight`), and both must travel, or the stale one would overwrite the trained one when loaded.
    """
    state = model.state_dict(keep_vars=True)
    if part == "all":
        return list(state)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return [k for k, v in state.items() if id(v) in trainable]


def check_private_trainable(model: nn.Module, part: str) -> None:
    """DP needs per-sample gradients of every trainable weight: no trainable module may keep running statistics."""
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if any(p.requires_grad for p in own) and list(module.buffers(recurse=False)):
            raise ConfigError(
                f"invalid value for 'model.trainable': with model.trainable={part}, '{name}' keeps running statistics "
                f"(frozen part) but its weights would need per-sample gradients under DP; freeze it or fold it "
                f"(common.trainable.fold_batchnorm) (got '{part}')"
            )


@dataclass(frozen=True)
class Split:
    """A frozen prefix (images → B x F features, run without autograd) and the trainable tail (features → logits)."""

    part: str
    prefix: Callable[[torch.Tensor], torch.Tensor]
    tail: Callable[[torch.Tensor], torch.Tensor]
    width: int  # F: features per image (0 = the prefix is the identity: pixels)

    @property
    def cacheable(self) -> bool:
        """The prefix is frozen and non-trivial: its outputs can be cached per image."""
        return self.width > 0


def make_split(model: nn.Module, part: str, image_size: int) -> Split:
    """The prefix/tail split of a hybrid for `part` (the identity prefix for 'all' and 'head+norm')."""
    if part in ("all", "head+norm"):
        return Split(part, lambda x: x, lambda x: model(x), 0)
    with torch.no_grad():
        was = model.training
        probe = model.eval().scales(torch.zeros(1, 3, image_size, image_size, device=_device(model)))
        model.train(was)
    c, h, w = (int(v) for v in probe.shape[1:])
    if part == "classifier":
        width = model.classifier.in_features
        return Split(part, lambda x: model.pool_tokens(model.forward_features(x)[0])[0], model.classify, width)
    if part == "head":
        return Split(part, lambda x: model.scales(x).flatten(1),
                     lambda f: model.forward_head(model.tokens_from(f.view(-1, c, h, w))[0])[0], c * h * w)
    if part == "last-stage":
        return _last_stage_split(model, image_size, (c, h, w))
    raise ConfigError(f"invalid value for 'model.trainable': unknown part '{part}'")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _last_stage_split(model: nn.Module, image_size: int, pooled: tuple[int, int, int]) -> Split:
    """Prefix: stem + every block group but the last (earlier scales pooled to the final grid, plus the last group's input)."""
    backbone = model.backbone
    last = len(backbone.blocks) - 1
    outs = sorted(backbone._stage_out_idx)  # stage numbers: block i feeds stage i + 1

    def run_front(x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = backbone.bn1(backbone.conv_stem(x))
        feats = [x] if 0 in outs else []
        for i in range(last):
            x = backbone.blocks[i](x)
            if i + 1 in outs:
                feats.append(x)
        return feats, x

    with torch.no_grad():
        was = model.training
        model.eval()
        feats, x = run_front(torch.zeros(1, 3, image_size, image_size, device=_device(model)))
        model.train(was)
    c, h, w = pooled
    early = sum(int(f.shape[1]) for f in feats)
    entry = tuple(int(v) for v in x.shape[1:])
    split_at = early * h * w

    def prefix(x: torch.Tensor) -> torch.Tensor:
        feats, x = run_front(x)
        early_pooled = torch.cat([F.adaptive_avg_pool2d(f, (h, w)) for f in feats], dim=1)
        return torch.cat([early_pooled.flatten(1), x.flatten(1)], dim=1)

    def tail(f: torch.Tensor) -> torch.Tensor:
        early_pooled = f[:, :split_at].reshape(-1, early, h, w)
        deepest = backbone.blocks[last](f[:, split_at:].reshape(-1, *entry))
        scales = torch.cat([early_pooled, F.adaptive_avg_pool2d(deepest, (h, w))], dim=1)
        return model.forward_head(model.tokens_from(scales)[0])[0]

    return Split("last-stage", prefix, tail, split_at + entry[0] * entry[1] * entry[2])
