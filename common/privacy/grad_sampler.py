"""Fast per-sample gradients for grouped/depthwise convolutions, registered with Opacus for histofed's own conv classes only.

Opacus's stock Conv2d grad sampler computes the full out-channel x in-channel block of every sample and
keeps the per-group diagonal (cost ~ groups²: 1152 channels → 1152² blocks). The sampler here unfolds the
(padded) input once and contracts each group with its own output channels only (cost ~ groups), exactly
the same numbers; it also hands its result to Opacus without the zero-filled buffer + copy Opacus makes
for every layer (a 16 x 1152 x 192 per-sample gradient is 14 MB). It is registered through Opacus's
grad-sampler registry (hooks mode) for two subclasses (`FastConv2d`, `FastConv2dSame`) that the DP model
builder swaps in; any other module, a plain `nn.Conv2d` included, keeps Opacus's own sampler.
It also registers the per-sample gradients of `ChannelAffine`, the folded BatchNorm of fine-tuning recipes, and
of `FastGRU`, an nn.GRU (same fused forward, same state_dict keys) whose per-sample gradients come from one
batched backward-through-time: Opacus's DPGRU unrolls the GRU into per-step Linear layers in Python and
accumulates a per-sample gradient at every step, and lists each weight under two keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleHooks
from opacus.grad_sample.grad_sample_module import create_or_accumulate_grad_sample
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import pad_same
from torch import nn

from common.trainable import ChannelAffine


class FastConv2d(nn.Conv2d):
    """nn.Conv2d (grouped, depthwise or dense); same forward and state_dict, per-group per-sample gradients."""


class FastConv2dSame(Conv2dSame):
    """timm's TensorFlow-'SAME' Conv2d (any groups); same forward and state_dict, per-group per-sample gradients."""


FAST_CLASSES: tuple[type[nn.Conv2d], ...] = (FastConv2d, FastConv2dSame)


def _padded(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input exactly as F.conv2d sees it after every padding step (so the sampler unfolds with padding 0)."""
    if isinstance(layer, Conv2dSame):
        return pad_same(x, layer.kernel_size, layer.stride, layer.dilation)
    pads = layer._reversed_padding_repeated_twice  # set for int, tuple and 'same'/'valid' padding alike
    if not any(pads):
        return x
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, pads, mode=mode)


def _store(layer: nn.Module, param: nn.Parameter, grad_sample: torch.Tensor) -> None:
    """Give Opacus the per-sample gradient; a fresh full batch is kept as is instead of zero-fill + copy."""
    if hasattr(param, "_current_grad_sample") or grad_sample.shape[0] != layer.max_batch_len:
        create_or_accumulate_grad_sample(param=param, grad_sample=grad_sample, max_batch_len=layer.max_batch_len)
    else:
        param._current_grad_sample = grad_sample  # our own tensor: nothing else holds or reuses it


def grouped_conv_grad_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients N x C_out x C_in/g x kh x kw computed group by group (Opacus grad-sampler signature).

    Non-empty batches are stored on the parameters directly (see `_store`), so the returned dict is empty.
    """
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    out: dict[nn.Parameter, torch.Tensor] = {}
    if n == 0:  # empty Poisson batch
        if layer.weight.requires_grad:
            out[layer.weight] = torch.zeros_like(layer.weight).unsqueeze(0)[:0]
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = torch.zeros_like(layer.bias).unsqueeze(0)[:0]
        return out
    groups = layer.groups
    grad_out = backprops.reshape(n, groups, layer.out_channels // groups, -1)  # N x g x r x L
    if layer.weight.requires_grad:
        if _pointwise(layer):  # 1x1, stride 1, no padding: the input is already the unfolded matrix
            cols = x.reshape(n, groups, layer.in_channels // groups, -1)
        else:
            cols = _unfold(_padded(layer, x), layer.kernel_size, layer.dilation, layer.stride)
            cols = cols.view(n, groups, -1, cols.shape[-1])  # N x g x (C_in/g * kh * kw) x L
        per_group = torch.einsum("ngrl,ngql->ngrq", grad_out, cols)  # N x g x r x q
        _store(layer, layer.weight, per_group.reshape(n, *layer.weight.shape))
    if layer.bias is not None and layer.bias.requires_grad:
        _store(layer, layer.bias, grad_out.sum(dim=-1).reshape(n, layer.out_channels))
    return out


def _unfold(x: torch.Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """im2col of an already padded input, any memory format: N x C x H x W → N x (C*kh*kw) x L (a strided view, one copy)."""
    x = x.contiguous()  # NCHW strides below (Opacus's own unfold2d assumes them, wrong for channels_last input)
    n, c, h, w = x.shape
    out_h = (h - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (w - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    sn, sc, sh, sw = x.stride()
    view = x.as_strided((n, c, kernel[0], kernel[1], out_h, out_w),
                        (sn, sc, sh * dilation[0], sw * dilation[1], sh * stride[0], sw * stride[1]))
    return view.reshape(n, c * kernel[0] * kernel[1], out_h * out_w)


def _pointwise(layer: nn.Conv2d) -> bool:
    return (not isinstance(layer, Conv2dSame) and tuple(layer.kernel_size) == (1, 1) and tuple(layer.stride) == (1, 1)
            and not any(layer._reversed_padding_repeated_twice))


def channel_affine_grad_sample(
    layer: ChannelAffine, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a folded BatchNorm (y = x·w[c] + b[c]): N x C each (Opacus grad-sampler signature)."""
    x = activations[0].to(backprops.dtype)
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        out[layer.weight] = (x * backprops).flatten(2).sum(-1)
    if layer.bias.requires_grad:
        out[layer.bias] = backprops.flatten(2).sum(-1)
    return out


class FastGRU(nn.GRU):
    """nn.GRU (one layer, batch_first, never packed); per-sample gradients by a batched backward-through-time."""


def _gru_direction(layer: nn.GRU, x: torch.Tensor, g: torch.Tensor, sfx: str) -> dict[nn.Parameter, torch.Tensor]:
    """One direction: recompute r, z, n (PyTorch's gate order) over the batch, then backpropagate g through time."""
    hidden = layer.hidden_size
    w_ih, w_hh = getattr(layer, f"weight_ih_l0{sfx}"), getattr(layer, f"weight_hh_l0{sfx}")
    b_ih, b_hh = getattr(layer, f"bias_ih_l0{sfx}"), getattr(layer, f"bias_hh_l0{sfx}")
    n_batch, steps = x.shape[0], x.shape[1]
    gi = x @ w_ih.t() + b_ih  # B x T x 3H
    h = x.new_zeros(n_batch, hidden)
    cache = []
    for t in range(steps):
        gh = h @ w_hh.t() + b_hh
        r = torch.sigmoid(gi[:, t, :hidden] + gh[:, :hidden])
        z = torch.sigmoid(gi[:, t, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
        n = torch.tanh(gi[:, t, 2 * hidden:] + r * gh[:, 2 * hidden:])
        cache.append((h, r, z, n, gh[:, 2 * hidden:]))
        h = (1 - z) * n + z * h
    d_gi, d_gh = x.new_empty(n_batch, steps, 3 * hidden), x.new_empty(n_batch, steps, 3 * hidden)
    h_prev = x.new_empty(n_batch, steps, hidden)
    carry = x.new_zeros(n_batch, hidden)
    for t in range(steps - 1, -1, -1):
        hp, r, z, n, gh_n = cache[t]
        dh = g[:, t] + carry
        dn = dh * (1 - z) * (1 - n * n)
        dz = dh * (hp - n) * z * (1 - z)
        dr = dn * gh_n * r * (1 - r)
        d_gi[:, t] = torch.cat([dr, dz, dn], dim=1)
        d_gh[:, t] = torch.cat([dr, dz, dn * r], dim=1)
        h_prev[:, t] = hp
        carry = dh * z + d_gh[:, t] @ w_hh
    out: dict[nn.Parameter, torch.Tensor] = {}
    for param, value in ((w_ih, lambda: torch.einsum("btg,bti->bgi", d_gi, x)), (b_ih, lambda: d_gi.sum(1)),
                         (w_hh, lambda: torch.einsum("btg,bth->bgh", d_gh, h_prev)), (b_hh, lambda: d_gh.sum(1))):
        if param.requires_grad:
            out[param] = value()
    return out


@torch.no_grad()
def gru_grad_sample(layer: FastGRU, activations: list[torch.Tensor], backprops: torch.Tensor
                    ) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of every GRU weight, given its input B x T x In and the output gradient B x T x (D*H)."""
    x = activations[0].to(backprops.dtype)
    hidden = layer.hidden_size
    out = _gru_direction(layer, x, backprops[..., :hidden], "")
    if layer.bidirectional:  # the reverse direction reads the sequence backwards
        out.update(_gru_direction(layer, x.flip(1), backprops[..., hidden:].flip(1), "_reverse"))
    return out


def use_fast_gru(module: nn.GRU) -> bool:
    """Switch a single-layer batch_first nn.GRU to FastGRU in place (same weights and keys); False if it does not fit."""
    if type(module) is not nn.GRU or module.num_layers != 1 or not module.batch_first:
        return False
    module.__class__ = FastGRU
    return True


GradSampleHooks.GRAD_SAMPLERS[ChannelAffine] = channel_affine_grad_sample
GradSampleHooks.GRAD_SAMPLERS[FastGRU] = gru_grad_sample
for _cls in FAST_CLASSES:  # hooks mode only (histofed's trainer); ghost clipping keeps Opacus's samplers
    GradSampleHooks.GRAD_SAMPLERS[_cls] = grouped_conv_grad_sample


def use_fast_convs(model: nn.Module) -> int:
    """Switch every nn.Conv2d and timm Conv2dSame of the model to its fast subclass in place; returns how many."""
    switched = 0
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = FastConv2d
            switched += 1
        elif type(module) is Conv2dSame:
            module.__class__ = FastConv2dSame
            switched += 1
    return switched
