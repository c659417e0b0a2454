"""Light through the section and the scanner: stain concentrations → optical density → RGB, then blur, JPEG, illumination, noise.

Beer–Lambert: I = I0 · 10^-(C_H·v_H + C_E·v_E) with the Ruifrok & Johnston (2001) vectors as the
reference; every lab's stain batch rotates them (towards Macenko's reference, plus noise) and scales
the concentrations. The canvas is rendered above the target size and box-averaged in linear
intensity (what a sensor pixel integrates), so edges are anti-aliased.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from common.datasets.tissue.canvas import (
    DENSE, EPI, FAT_WALL, MUCIN, MYXOID, RBC, SECRETION, STROMA, WHITE, Canvas, box_mean,
)
from common.datasets.tissue.nuclei import Nuclei

H_OD = np.array([0.650, 0.704, 0.286])  # haematoxylin optical density (Ruifrok & Johnston 2001)
E_OD = np.array([0.072, 0.990, 0.105])  # eosin
H_MACENKO = np.array([0.5626, 0.7201, 0.4062])  # torchstain's Macenko reference: another lab's estimate
E_MACENKO = np.array([0.2159, 0.8012, 0.5581])

# Base (haematoxylin, eosin) concentration of each compartment, and how much texture modulates it.
COMPARTMENT_STAIN: dict[int, tuple[float, float]] = {
    WHITE: (0.0, 0.0), STROMA: (0.025, 0.27), EPI: (0.045, 0.23), MUCIN: (0.06, 0.02), MYXOID: (0.062, 0.035),
    SECRETION: (0.015, 0.12), FAT_WALL: (0.03, 0.30), RBC: (0.0, 0.85), DENSE: (0.04, 0.40),
}
_BASE = np.array([COMPARTMENT_STAIN.get(c, (0.0, 0.0)) for c in range(256)], np.float32)  # indexed by code


@dataclass(frozen=True)
class Stain:
    """A slide's staining: unit OD vectors, concentration scales, glass tint (OD)."""

    h_vector: np.ndarray
    e_vector: np.ndarray
    h_scale: float
    e_scale: float
    glass: np.ndarray  # OD of the empty slide (3,), small


@dataclass(frozen=True)
class Scanner:
    """A lab's scanner and pipeline."""

    blur_um: float  # Gaussian sigma of the optics (defocus), micrometres
    sharpen: float  # unsharp-mask amount applied by the scanner software (0 = none)
    jpeg: int  # JPEG quality (0 = lossless)
    illumination: float  # strength of the uneven-illumination gradient (0 = flat)
    noise: float  # sensor noise sd (0..1 intensity units)
    gains: np.ndarray  # per-channel colour-profile gains (3,)
    gamma: float  # tone curve


def unit(v: np.ndarray) -> np.ndarray:
    """Non-negative unit vector."""
    v = np.abs(np.asarray(v, dtype=np.float64))
    return v / np.linalg.norm(v)


def lab_vectors(rng: np.random.Generator, towards_macenko: float, jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """A lab's H and E vectors: the Ruifrok–Johnston ones moved towards another lab's and jittered."""
    h = unit((1 - towards_macenko) * H_OD + towards_macenko * H_MACENKO + rng.normal(0, jitter, 3))
    e = unit((1 - towards_macenko) * E_OD + towards_macenko * E_MACENKO + rng.normal(0, jitter, 3))
    return h, e


def concentrations(cv: Canvas, nuc: Nuclei, rng: np.random.Generator, *, fibre_angle: float,
                   fibre_contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin concentration maps of the canvas (textures, membranes, nuclei)."""
    tex = cv.textures
    h, e = np.take(_BASE[:, 0], cv.comp), np.take(_BASE[:, 1], cv.comp)
    fibres = tex.fibre(fibre_angle, rng)
    fibrous = cv.where(STROMA, DENSE, MYXOID, FAT_WALL)
    e = np.where(fibrous, e * np.clip(1.0 + fibre_contrast * fibres, 0.15, 2.5), e)
    medium = tex.crop(tex.medium, rng)
    pale = cv.where(MUCIN, SECRETION, MYXOID)
    wisps = tex.fibre(fibre_angle + 1.0, rng)
    h = np.where(pale, h * np.clip(1.0 + 0.35 * medium + 0.25 * wisps, 0.2, 2.5), h)
    e = np.where(cv.comp == SECRETION, e * np.clip(1.0 + 0.8 * medium, 0.0, 2.5), e)
    epi = cv.comp == EPI
    if nuc.owner.max() >= 0:
        cyto = nuc.cyto * (1.0 + 0.12 * tex.crop(tex.fine, rng)) * (1.0 - 0.65 * nuc.halo)
        e = np.where(epi, cyto, e)
        e = np.where(epi & nuc.membrane, e + 0.11, e)
        h = np.where(epi & nuc.membrane, h + 0.03, h)
        e = e * (1 - nuc.cover) + nuc.e * nuc.cover
        h = h * (1 - nuc.cover) + nuc.h * nuc.cover
    return h, e


def to_rgb(h: np.ndarray, e: np.ndarray, stain: Stain, scanner: Scanner, *, factor: int, um_per_px: float,
           rng: np.random.Generator) -> np.ndarray:
    """Concentrations (hi-res) → uint8 RGB at hi-res / factor (um_per_px of the output), through stain and scanner."""
    ch, ce = h * stain.h_scale, e * stain.e_scale
    od = np.empty((*h.shape, 3), np.float32)
    for c in range(3):  # per channel: the same float64 sums as broadcasting over a trailing axis, in cache
        od[..., c] = ch * stain.h_vector[c] + ce * stain.e_vector[c] + stain.glass[c]
    light = np.exp(-np.log(10.0) * od)
    if factor > 1:  # anti-aliasing: each sensor pixel integrates factor x factor canvas pixels
        light = box_mean(light, factor)
    return scan(light, scanner, um_per_px, rng)


def scan(light: np.ndarray, scanner: Scanner, um_per_px: float, rng: np.random.Generator) -> np.ndarray:
    """Transmitted light (H x W x 3, 0..1) → the lab's uint8 RGB image (focus, software, illumination, sensor, JPEG)."""
    sigma = scanner.blur_um / um_per_px
    if sigma > 0.15:
        light = ndimage.gaussian_filter(light, (sigma, sigma, 0), mode="reflect", truncate=2.5)
    if scanner.sharpen > 0:
        light = light + scanner.sharpen * (light - ndimage.gaussian_filter(light, (1.0, 1.0, 0), truncate=2.0))
    n = light.shape[0]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.arange(n)[:, None] * np.sin(angle) + np.arange(n)[None, :] * np.cos(angle)) / n
    ramp = ramp - ramp.min()
    light = light * (1.0 - scanner.illumination * ramp / max(ramp.max(), 1e-6))[..., None]
    light = np.clip(light * scanner.gains, 0.0, 1.0) ** (1.0 / scanner.gamma)
    light = light + rng.normal(0.0, scanner.noise, light.shape) * np.sqrt(np.clip(light, 0.05, 1.0))
    rgb = (np.clip(light, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return jpeg(rgb, scanner.jpeg) if scanner.jpeg else rgb


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip through JPEG at this quality, in memory (PIL)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf, formats=("JPEG",)) as decoded:
        return np.asarray(decoded if decoded.mode == "RGB" else decoded.convert("RGB"))
