"""AdaBN (Li et al. 2016): re-estimate BatchNorm running statistics on a hospital's own unlabeled images.

A hospital that never trained sees stain and scanner statistics the federation never averaged. AdaBN
resets every BatchNorm layer's running mean/variance and re-estimates them as a cumulative average
(momentum=None) over the hospital's images, in train mode for the norm layers only (dropout and
stochastic depth stay off) and without gradients; each layer's momentum is restored afterwards. Nothing
else changes: no weight, no label, no optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from common.training import make_loader, to_input

Images = Union[np.ndarray, torch.Tensor]  # uint8 N x H x W x 3 (histofed's loaders), or float model input N x 3 x H x W
Source = Union[Dataset, Images, Iterable]


class NoNormStatistics(ValueError):
    """The model has no BatchNorm running statistics to re-estimate (e.g. the DP GroupNorm model)."""


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that keep running statistics."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None]


def has_norm_statistics(model: nn.Module) -> bool:
    """Whether AdaBN can adapt this model."""
    return bool(batchnorm_layers(model))


def _batches(source: Source, batch_size: int) -> Iterator[Images]:
    if isinstance(source, (np.ndarray, torch.Tensor)):
        for start in range(0, len(source), batch_size):
            yield source[start:start + batch_size]
    elif isinstance(source, Dataset):  # a SiteSplit: labels are read by the loader, never used
        for images, _, _ in make_loader(source, batch_size, seed=None, num_workers=0):
            yield images
    else:  # a DataLoader or any iterable of batches (images, or tuples whose first item is the images)
        for item in source:
            yield item[0] if isinstance(item, (tuple, list)) else item


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, source: Source, *, batch_size: int = 64, channels_last: bool = True,
                    max_images: int = 0) -> int:
    """Replace the running statistics of every BatchNorm layer with those of `source`'s images; returns images used.

    source: a SiteSplit/Dataset, uint8 images N x H x W x 3, or an iterable of such batches (float
    N x 3 x H x W tensors are taken as model input). max_images > 0 stops after that many images.
    Raises NoNormStatistics for a model without BatchNorm statistics, ValueError for no usable image.
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise NoNormStatistics("the model has no BatchNorm running statistics to re-estimate (AdaBN needs them; "
                               "the differential-privacy model uses GroupNorm)")
    device = next(model.parameters()).device
    was_training = model.training
    saved = [(m, m.momentum, m.training) for m in layers]
    backup = {id(m): (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers}
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
        m.train()
    used = 0
    try:
        for images in _batches(source, batch_size):
            if max_images and used >= max_images:
                break
            images = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
            if images.shape[0] < 2:  # a lone image has no batch statistics worth averaging
                continue
            x = images.to(device) if images.is_floating_point() else to_input(images, device, channels_last)
            model(x)
            used += images.shape[0]
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    if used == 0:
        for m in layers:  # nothing was seen: the statistics stay as they were
            m.running_mean.copy_(backup[id(m)][0])
            m.running_var.copy_(backup[id(m)][1])
            m.num_batches_tracked.copy_(backup[id(m)][2])
        raise ValueError("AdaBN found no batch of 2 or more readable images to estimate statistics from")
    return used
