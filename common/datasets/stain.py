"""Stain handling: Macenko normalisation (torchstain) to one reference, and H&E (HED) jitter augmentation.

Macenko et al. 2009 via torchstain's numpy backend; without a reference patch torchstain's
standard H&E reference is used, so every hospital normalises to the same target without sharing
images. HED jitter follows Tellez et al. 2018: each image's haematoxylin, eosin and DAB
concentrations (Ruifrok & Johnston colour deconvolution) are scaled by 1±σ and shifted by ±σ.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from common.datasets.images import read_rgb

if TYPE_CHECKING:
    from common.config import DataConfig

Transform = Callable[[np.ndarray], np.ndarray]

RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


class MacenkoTransform:
    """Normalise uint8 RGB patches to a reference stain; patches Macenko cannot fit pass unchanged."""

    def __init__(self, reference: Path | None = None) -> None:
        import torchstain

        self.normalizer = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        if reference is not None:
            self.normalizer.fit(read_rgb(reference))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out, _, _ = self.normalizer.normalize(I=image, stains=False)
        except (np.linalg.LinAlgError, ValueError, IndexError):
            return image  # e.g. a blank patch with too little tissue to estimate stains
        out = np.asarray(out, dtype=np.float64)
        if not np.isfinite(out).all():
            return image
        return np.ascontiguousarray(np.clip(out, 0, 255).astype(np.uint8))


class HedJitter:
    """Random per-image H&E concentration scaling/shift (draws from torch's RNG: seeded per worker)."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def __call__(self, image: np.ndarray) -> np.ndarray:
        od = -np.log((image.astype(np.float64) + 1.0) / 256.0)
        hed = od.reshape(-1, 3) @ HED_FROM_RGB
        draws = torch.rand(6).numpy() * 2.0 - 1.0
        alpha, beta = 1.0 + self.sigma * draws[:3], self.sigma * draws[3:]
        od_new = (hed * alpha + beta) @ RGB_FROM_HED
        rgb = 256.0 * np.exp(-od_new) - 1.0
        return np.clip(rgb, 0, 255).astype(np.uint8).reshape(image.shape)


class Chain:
    """Apply transforms in order."""

    def __init__(self, *steps: Transform) -> None:
        self.steps = steps

    def __call__(self, image: np.ndarray) -> np.ndarray:
        for step in self.steps:
            image = step(image)
        return image


def stain_transform(cfg: DataConfig, *, train: bool) -> Transform | None:
    """The configured per-image stain pipeline: normalise (all splits), then jitter (training only)."""
    steps: list[Transform] = []
    if cfg.stain_normalize == "macenko":
        ref = Path(cfg.stain_reference) if cfg.stain_reference else None
        if ref is not None and not ref.is_file():
            raise FileNotFoundError(f"data.stain-reference: file not found: {ref}")
        steps.append(MacenkoTransform(ref))
    if train and cfg.stain_augment > 0:
        steps.append(HedJitter(cfg.stain_augment))
    return Chain(*steps) if steps else None
