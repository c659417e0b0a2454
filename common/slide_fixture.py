"""Generated whole-slide images for tests and benchmarks: a pyramidal tiled TIFF (tifffile) OpenSlide reads.

Everything here is SYNTHETIC. Pixels are a closed-form function of level-0 position, so any region at any
level is known exactly: near-white glass; a tissue rectangle whose pink colour encodes position (red rises
with y, blue with x); inside it a rectangle of different (purple, haematoxylin-rich) tissue; optionally a
green pen stroke. The TIFF is written tile by tile (bounded memory, also for 100,000 px slides) with the
resolution tags when `mpp` is given (OpenSlide then reports openslide.mpp-x).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.slides import INSTALL_HINT, SlideError

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 at level 0 (x1, y1 exclusive)
GLASS = (243, 243, 241)
REGION = (125, 70, 165)  # haematoxylin-rich (OD: green largest)
PEN = (50, 150, 80)  # green ink: absorbs red and blue, not green


@dataclass(frozen=True)
class SlideSpec:
    """A generated slide: level-0 size, µm/px (None = no resolution tags), where tissue, region and pen are."""

    width: int
    height: int
    tissue: Box
    region: Box | None = None
    pen: Box | None = None
    mpp: float | None = 0.25
    levels: int = 3
    tile: int = 256


def render(spec: SlideSpec, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Pixels [y, y+h) x [x, x+w) of `level` (that level's coordinates), each sampled at its level-0 centre."""
    ds = 2**level
    px = ((np.arange(x, x + w) + 0.5) * ds)[None, :]
    py = ((np.arange(y, y + h) + 0.5) * ds)[:, None]
    out = np.empty((h, w, 3), np.uint8)
    out[:] = GLASS
    t = _inside(spec.tissue, px, py)
    red = np.broadcast_to(185 + 50 * py / spec.height, (h, w))
    blue = np.broadcast_to(150 + 60 * px / spec.width, (h, w))
    out[..., 0] = np.where(t, red, out[..., 0])
    out[..., 1] = np.where(t, 115, out[..., 1])
    out[..., 2] = np.where(t, blue, out[..., 2])
    for box, colour in ((spec.region, REGION), (spec.pen, PEN)):
        if box is not None:
            out[_inside(box, px, py)] = colour
    return out


def _inside(box: Box, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = box
    return (px >= x0) & (px < x1) & (py >= y0) & (py < y1)


def level_size(spec: SlideSpec, level: int) -> tuple[int, int]:
    """Width and height of a level (halved per level, floored)."""
    return spec.width // 2**level, spec.height // 2**level


def _tiles(spec: SlideSpec, level: int) -> Iterator[bytes]:
    """The level's tiles, row by row, deflate-compressed (glass-only tiles are compressed once and repeated)."""
    width, height = level_size(spec, level)
    t = spec.tile
    blank = np.empty((t, t, 3), np.uint8)
    blank[:] = GLASS
    blank_bytes = zlib.compress(blank.tobytes())
    ds = 2**level
    boxes = [b for b in (spec.tissue, spec.region, spec.pen) if b is not None]
    for y in range(0, height, t):
        for x in range(0, width, t):
            x0, y0, x1, y1 = x * ds, y * ds, (x + t) * ds, (y + t) * ds
            if not any(b[0] < x1 and b[2] > x0 and b[1] < y1 and b[3] > y0 for b in boxes):
                yield blank_bytes
            else:
                yield zlib.compress(render(spec, level, x, y, t, t).tobytes())


def write_slide(path: Path, spec: SlideSpec) -> Path:
    """Write `spec` as a pyramidal tiled TIFF (deflate), level by level, one compressed tile at a time."""
    try:
        import tifffile
    except ImportError:
        raise SlideError(f"writing test slides needs tifffile: {INSTALL_HINT}") from None
    big = spec.width * spec.height * 3 > 2**31
    with tifffile.TiffWriter(path, bigtiff=big) as tw:
        for level in range(spec.levels):
            width, height = level_size(spec, level)
            extra = {}
            if spec.mpp:
                per_cm = 1e4 / (spec.mpp * 2**level)
                extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(_tiles(spec, level), shape=(height, width, 3), dtype=np.uint8, tile=(spec.tile, spec.tile),
                     photometric="rgb", compression="deflate", subfiletype=1 if level else 0, **extra)
    return path
