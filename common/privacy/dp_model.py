"""The DP-compatible hybrid: BatchNorm → GroupNorm, in-place activations off, nn.GRU → Opacus DPGRU, fast grouped convs.

With a fine-tuning part (`model.trainable` other than `all`, common/trainable.py) only the TRAINABLE modules
are converted: frozen BatchNorm layers and a frozen nn.GRU stay as they are (Opacus validates and hooks only
modules with trainable parameters), BatchNorms whose affine weights train were already folded into
`FrozenNormAct`, so the pretrained function is kept exactly, and a trainable GRU becomes `FastGRU` (nn.GRU's
forward and keys, per-sample gradients by a batched backward-through-time) instead of DPGRU.

Opacus cannot compute per-sample gradients through BatchNorm (it mixes samples), and its validator does
not notice timm's `BatchNormAct2d` (an nn.BatchNorm2d subclass), so `make_private` would fail late.
Every norm layer becomes `GroupNormAct` (a plain nn.GroupNorm, which Opacus handles natively, then the
activation). Server and every client build this model with the SAME function from the SAME config, so
weights match by key (`bn1.norm.weight`, ...). The model has no buffers, so nothing but weights travels.
"""

from __future__ import annotations

from opacus.layers import DPGRU
from opacus.validators import ModuleValidator
from torch import nn

from common.errors import ConfigError
from common.norms import group_norm_from
from common.privacy.grad_sampler import use_fast_convs, use_fast_gru


def _gru_from(gru: nn.GRU) -> DPGRU:
    """Opacus's DPGRU with the GRU's weights (same parameter names; the key order differs, so load by key)."""
    dp = DPGRU(gru.input_size, gru.hidden_size, num_layers=gru.num_layers, bias=gru.bias,
               batch_first=gru.batch_first, dropout=gru.dropout, bidirectional=gru.bidirectional)
    dp.load_state_dict(gru.state_dict())
    return dp


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _replace_children(module: nn.Module, *, only_trainable: bool) -> None:
    for name, child in module.named_children():
        if only_trainable and not _trains(child):
            continue
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, group_norm_from(child))
        elif type(child) is nn.GRU and not (only_trainable and use_fast_gru(child)):  # fine-tuning: same nn.GRU keys
            setattr(module, name, _gru_from(child))
        else:
            _replace_children(child, only_trainable=only_trainable)


def make_dp_compatible(model: nn.Module, *, fast_depthwise: bool = True, what: str = "model",
                       trainable: str = "all") -> nn.Module:
    """Convert in place (and return) a model for DP-SGD; raise ConfigError when Opacus still rejects a layer.

    trainable='all' converts every layer; any other part converts only the trainable ones (frozen layers need no
    per-sample gradients) and refuses a trainable layer that keeps running statistics.
    """
    from common.trainable import check_private_trainable

    _replace_children(model, only_trainable=trainable != "all")
    if trainable != "all":
        check_private_trainable(model, trainable)
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False  # in-place ops break Opacus's backward hooks
    if fast_depthwise:
        use_fast_convs(model)
    errors = ModuleValidator.validate(model, strict=False)  # checks trainable modules only
    buffers = [name for name, _ in model.named_buffers()] if trainable == "all" else []
    if errors or buffers:
        first = str(errors[0]).splitlines()[0] if errors else f"buffer '{buffers[0]}' (running statistics)"
        raise ConfigError(
            f"differential privacy cannot use this {what}: {first}. "
            "Set privacy.mode=off or choose model.architecture=hybrid"
        )
    return model
