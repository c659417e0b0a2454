"""The hi-resolution drawing surface of one patch: compartment map, cell seeds with nuclear attributes, geometry helpers."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from common.datasets.tissue.textures import Bank, bank

# Compartments (uint8 codes); each has base stain concentrations in optics.COMPARTMENT_STAIN.
WHITE, STROMA, EPI, MUCIN, MYXOID, SECRETION, FAT_WALL, RBC, DENSE = range(9)

SEED_FIELDS = ("y", "x", "a", "b", "angle", "dark", "ves", "nucleolus", "irr", "lobes", "phase", "mitosis",
               "cyto", "visible", "halo")


@dataclass
class Canvas:
    """n x n pixels of px_um micrometres; painters write compartments, then add cell seeds."""

    n: int
    px_um: float
    rng: np.random.Generator
    comp: np.ndarray = field(init=False)
    seeds: list[dict[str, np.ndarray]] = field(init=False, default_factory=list)
    textures: Bank = field(init=False)

    def __post_init__(self) -> None:
        self.comp = np.full((self.n, self.n), STROMA, dtype=np.uint8)
        self.textures = bank(self.n, self.px_um)
        self.yy, self.xx = np.mgrid[0 : self.n, 0 : self.n].astype(np.float32)

    @property
    def field_um(self) -> float:
        """Side of the patch in micrometres."""
        return self.n * self.px_um

    def px(self, um: float | np.ndarray) -> float | np.ndarray:
        """Micrometres to canvas pixels."""
        return um / self.px_um

    def share(self, *codes: int) -> float:
        """Fraction of the patch in these compartments."""
        return float(self.where(*codes).mean())

    def where(self, *codes: int) -> np.ndarray:
        """Mask of the pixels in these compartments."""
        return np.take(_lut(codes), self.comp)

    def add_seeds(self, y: np.ndarray, x: np.ndarray, nuclei: dict[str, np.ndarray]) -> None:
        """Cells with nucleus centres at (y, x) px; `nuclei` holds the other SEED_FIELDS (arrays of len(y))."""
        y = np.atleast_1d(np.asarray(y, np.float32))
        if y.size:
            self.seeds.append({"y": y, "x": np.atleast_1d(np.asarray(x, np.float32)), **nuclei})

    def drop_seeds(self, mask: np.ndarray) -> None:
        """Remove the cells whose centre lies in mask (e.g. beyond a tissue edge)."""
        for k, row in enumerate(self.seeds):
            iy = np.clip(np.round(row["y"]).astype(int), 0, self.n - 1)
            ix = np.clip(np.round(row["x"]).astype(int), 0, self.n - 1)
            keep = ~mask[iy, ix]
            self.seeds[k] = {name: col[keep] for name, col in row.items()}

    def nuclear_share(self) -> float:
        """Expected share of the patch covered by dark chromatin: visible nuclear area, vesicular nuclei counting half."""
        area = 0.0
        for row in self.seeds:
            inside = (row["y"] >= 0) & (row["y"] < self.n) & (row["x"] >= 0) & (row["x"] < self.n)
            dense = 1.0 - 0.5 * np.clip(row["ves"], 0.0, 1.0)
            area += float((np.pi * row["a"] * row["b"] * row["visible"] * dense * inside).sum())
        return area / self.field_um**2

    def seed_table(self) -> dict[str, np.ndarray]:
        """All seeds near the patch as one float32 column table (empty columns when there are none)."""
        if not self.seeds:
            return {name: np.zeros(0, np.float32) for name in SEED_FIELDS}
        table = {name: np.concatenate([s[name] for s in self.seeds]).astype(np.float32) for name in SEED_FIELDS}
        y, x = table["y"], table["x"]
        keep = (y > -4) & (y < self.n + 4) & (x > -4) & (x < self.n + 4)
        return {name: col[keep] for name, col in table.items()}

    # ---- geometry helpers ----------------------------------------------------------------------

    def threshold(self, noise: np.ndarray, share: float, where: np.ndarray | None = None) -> np.ndarray:
        """Mask of the top `share` of a noise field (within `where`): irregular regions of a chosen area."""
        values = noise if where is None else noise[where]
        if values.size == 0 or share <= 0:
            return np.zeros_like(noise, dtype=bool)
        cut = np.partition(values.ravel(), int((1 - min(share, 1.0)) * (values.size - 1)))[
            int((1 - min(share, 1.0)) * (values.size - 1))]
        mask = noise >= cut
        return mask if where is None else mask & where

    def distance_to(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance in micrometres from every pixel to the mask, and the flat index of the nearest mask pixel."""
        if not mask.any():
            return np.full(mask.shape, 1e6, np.float32), np.zeros(mask.shape, np.int64)
        dist, idx = ndimage.distance_transform_edt(~mask, return_indices=True)
        return (dist * self.px_um).astype(np.float32), idx[0] * self.n + idx[1]

    def raster_curve(self, pts: np.ndarray) -> np.ndarray:
        """Mask of the pixels a dense (M x 2, y/x px) curve passes through."""
        mask = np.zeros((self.n, self.n), bool)
        iy, ix = np.round(pts[:, 0]).astype(int), np.round(pts[:, 1]).astype(int)
        ok = (iy >= 0) & (iy < self.n) & (ix >= 0) & (ix < self.n)
        mask[iy[ok], ix[ok]] = True
        return mask


def box_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Means of factor x factor blocks of an H x W x C image: bit for bit numpy's mean over the block axes
    (it sums them in this order for this layout), several times faster."""
    n = image.shape[0] // factor
    blocks = image[: n * factor, : n * factor].reshape(n, factor, n, factor, image.shape[2])
    acc = blocks[:, 0, :, 0].copy()
    for dy in range(factor):
        for dx in range(factor):
            if dy or dx:
                acc += blocks[:, dy, :, dx]
    return acc / (factor * factor)


@functools.lru_cache(maxsize=64)
def _lut(codes: tuple[int, ...]) -> np.ndarray:
    """Membership table of these compartment codes (read-only)."""
    lut = np.zeros(256, bool)
    lut[list(codes)] = True
    lut.flags.writeable = False
    return lut


def resample(curve: np.ndarray, spacing_px: float, rng: np.random.Generator, *, closed: bool,
             jitter: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Points every ~spacing_px along a dense curve (M x 2, y/x) and the tangent angle (atan2(dy, dx)) there."""
    pts = np.concatenate((curve, curve[:1])) if closed else curve
    step_yx = pts[1:] - pts[:-1]
    arc = np.zeros(len(pts))
    np.cumsum(np.hypot(step_yx[:, 0], step_yx[:, 1]), out=arc[1:])
    total = arc[-1]
    count = max(1, int(total / spacing_px))
    step = total / count
    where = (np.arange(count) + 0.5 + rng.uniform(-jitter, jitter, count)) * step
    where = np.clip(where, 0, total - 1e-6)
    y, x = np.interp(where, arc, pts[:, 0]), np.interp(where, arc, pts[:, 1])
    d = np.empty_like(pts)
    d[1:-1] = pts[2:] - pts[:-2]
    d[0], d[-1] = pts[1] - pts[0], pts[-1] - pts[-2]
    ty, tx = np.interp(where, arc, d[:, 0]), np.interp(where, arc, d[:, 1])
    return np.stack([y, x], 1), np.arctan2(ty, tx)


def offset(points: np.ndarray, tangent: np.ndarray, distance_px: float | np.ndarray) -> np.ndarray:
    """Move points along their left normal by distance_px (negative: the other side)."""
    ny, nx = np.cos(tangent), -np.sin(tangent)  # normal to (sin, cos) in (y, x)
    return points + np.stack([ny, nx], 1) * np.asarray(distance_px).reshape(-1, 1)
