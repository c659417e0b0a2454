"""Noise textures shared by every patch of a process (fibres, chromatin, smooth fields): made once, then cropped."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

FIBRE_ANGLES = 8  # orientations in steps of 22.5 degrees (4 computed, 4 by transposition)


@dataclass(frozen=True)
class Bank:
    """Zero-mean, unit-sd textures of side 2n for a canvas of side n (crop a random n x n window)."""

    n: int
    fibres: tuple[np.ndarray, ...]  # FIBRE_ANGLES oriented collagen textures
    fine: np.ndarray  # chromatin-scale isotropic noise (~0.6 um)
    medium: np.ndarray  # ~3 um: mucin wisps, myxoid stroma, secretion
    smooth: np.ndarray  # ~12 um: nests, mucin lakes, fat zones
    coarse: np.ndarray  # ~30 um: tissue edges, lobules

    def crop(self, texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A random n x n window (a view, no copy)."""
        oy, ox = rng.integers(0, texture.shape[0] - self.n + 1, 2)
        return texture[oy : oy + self.n, ox : ox + self.n]

    def fibre(self, angle: float, rng: np.random.Generator) -> np.ndarray:
        """Collagen texture whose fibres run at `angle` radians (nearest of FIBRE_ANGLES)."""
        k = int(np.round(angle / (np.pi / FIBRE_ANGLES))) % FIBRE_ANGLES
        return self.crop(self.fibres[k], rng)


@functools.lru_cache(maxsize=4)
def bank(n: int, px_um: float) -> Bank:
    """The texture bank of a canvas of n pixels of px_um micrometres (deterministic: fixed seed)."""
    rng = np.random.default_rng(20011987)  # Ruifrok & Johnston 2001; any fixed seed would do
    side = 2 * n
    base = [_oriented(rng, side, px_um, k * np.pi / FIBRE_ANGLES) for k in range(FIBRE_ANGLES // 2)]
    fibres = tuple(base + [np.ascontiguousarray(t.T[::-1]) for t in base])  # +90 degrees
    return Bank(
        n=n, fibres=fibres, fine=_isotropic(rng, side, 0.6 / px_um), medium=_isotropic(rng, side, 3.0 / px_um),
        smooth=_isotropic(rng, side, 12.0 / px_um), coarse=_isotropic(rng, side, 30.0 / px_um),
    )


def _normalise(field: np.ndarray) -> np.ndarray:
    field = field - field.mean()
    return (field / (field.std() + 1e-8)).astype(np.float32)


def _isotropic(rng: np.random.Generator, side: int, sigma_px: float) -> np.ndarray:
    """White noise low-passed by a Gaussian of sigma_px (in the Fourier domain: periodic, no edge effects)."""
    f = np.fft.fftfreq(side)
    k2 = f[:, None] ** 2 + f[None, :] ** 2
    spectrum = np.fft.fft2(rng.standard_normal((side, side))) * np.exp(-2 * (np.pi * sigma_px) ** 2 * k2)
    return _normalise(np.fft.ifft2(spectrum).real)


def _oriented(rng: np.random.Generator, side: int, px_um: float, angle: float) -> np.ndarray:
    """Wavy fibres along `angle`: long correlation along it (~14 um), short across (~1 um), plus bundles."""
    f = np.fft.fftfreq(side)
    fy, fx = np.meshgrid(f, f, indexing="ij")
    along = fx * np.cos(angle) + fy * np.sin(angle)  # frequency along the fibre direction (x = cols, y = rows)
    across = -fx * np.sin(angle) + fy * np.cos(angle)
    s_along, s_across = 7.0 / px_um, 0.9 / px_um
    gain = np.exp(-2 * np.pi**2 * ((s_along * along) ** 2 + (s_across * across) ** 2))
    fibres = np.fft.ifft2(np.fft.fft2(rng.standard_normal((side, side))) * gain).real
    bundles = np.fft.ifft2(np.fft.fft2(rng.standard_normal((side, side))) * np.exp(
        -2 * np.pi**2 * ((20.0 / px_um * along) ** 2 + (4.0 / px_um * across) ** 2))).real
    texture = _normalise(fibres) + 0.7 * _normalise(bundles)
    # waviness: displace the texture by a smooth field (~15 um), so fibres bend instead of running straight
    warp = [_isotropic(rng, side, 15.0 / px_um) * (4.0 / px_um) for _ in range(2)]
    grid = np.mgrid[0:side, 0:side].astype(np.float32)
    texture = ndimage.map_coordinates(texture, [grid[0] + warp[0], grid[1] + warp[1]], order=1, mode="wrap")
    return _normalise(texture)
