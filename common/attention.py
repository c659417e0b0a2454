"""Attention maps of the hybrid mapped back onto the input image (which regions the GRU attention weighted)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.training import to_input


@torch.no_grad()
def attention_maps(model: nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x H x W x 3 → (N x H x W attention upsampled to the image, N x K class probabilities)."""
    model.eval()
    device = next(model.parameters()).device
    logits, attn = model(to_input(images, device), return_attention=True)  # attn: N x h x w, sums to 1
    return upsample(attn, images.shape[1:3]), torch.softmax(logits.float(), dim=1).cpu().numpy()


def upsample(attn: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """N x h x w attention weights → N x H x W (bilinear) on the CPU."""
    return F.interpolate(attn[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0].cpu().numpy()


def overlay(image: np.ndarray, heat: np.ndarray, strength: float = 0.6) -> np.ndarray:
    """Blend a heat map (any scale) over a uint8 RGB image in red; output has the image's size."""
    span = float(heat.max() - heat.min())
    norm = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    alpha = (strength * norm)[..., None]
    red = np.array([255.0, 0.0, 0.0])
    return ((1 - alpha) * image.astype(np.float64) + alpha * red).clip(0, 255).astype(np.uint8)


def contour_levels(heat: np.ndarray, quantiles: tuple[float, ...] = (0.5, 0.8, 0.95)) -> list[float]:
    """Attention values whose contours enclose the top 50 / 20 / 5 % of pixels (strictly increasing; [] if flat)."""
    levels = np.quantile(np.asarray(heat, dtype=np.float64), quantiles)
    out: list[float] = []
    for level in levels:
        if level > heat.min() and level < heat.max() and (not out or level > out[-1]):
            out.append(float(level))
    return out


def panel(image: np.ndarray, heat: np.ndarray, *, zoom: int = 4, levels: tuple[float, ...] | None = None) -> np.ndarray:
    """Side by side: the tissue as it is | the tissue with the attention map's contours (uint8 RGB, zoomed).

    Contours are drawn where the attention crosses each level (default: contour_levels, the values enclosing
    the top 50 / 20 / 5 % of pixels), so the tissue under the attention stays visible (no colour wash).
    """
    from PIL import Image

    h, w = image.shape[:2]
    big = np.asarray(Image.fromarray(image).resize((w * zoom, h * zoom), Image.BILINEAR)).copy()
    hot = np.asarray(Image.fromarray(heat.astype(np.float32)).resize((w * zoom, h * zoom), Image.BILINEAR))
    marked = big.copy()
    colours = ((255, 220, 0), (0, 230, 255), (255, 255, 255))
    for level, colour in zip(contour_levels(hot) if levels is None else levels, colours):
        inside = hot >= level
        edge = np.zeros_like(inside)
        edge[:-1] |= inside[:-1] != inside[1:]
        edge[:, :-1] |= inside[:, :-1] != inside[:, 1:]
        marked[edge] = colour
    gap = np.full((h * zoom, max(2, zoom), 3), 255, np.uint8)
    return np.concatenate([big, gap, marked], axis=1)
