"""Whole-slide images: open with OpenSlide, find tissue on a thumbnail, plan tiles at the model's µm/px, read them lazily.

Memory stays bounded whatever the slide's size (100,000 x 80,000 px is ordinary): the thumbnail is built
from the pyramid level nearest to it, read in chunks; tiles are read one region at a time by a Dataset that
holds only their coordinates. No whole level is ever read.

Tissue (Otsu 1979 on optical density): a (blurred) thumbnail pixel is tissue when its summed optical density is above
Otsu's threshold (never below MIN_OD), it is coloured (background glass and dust are grey) and, like every
H&E stain, it absorbs green the most (blue, green and black pen marks do not). A tile is kept when at least
`min_tissue` of its thumbnail footprint is tissue.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common.datasets.images import to_square
from common.datasets.splits import SiteSplit

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'histofed[slides]'"
MIN_OD = 0.08  # summed RGB optical density below which nothing is tissue (clean glass ~0.06; pale stroma ~0.14)
MIN_CHROMA = 0.04  # max - min channel OD: stained tissue is coloured, glass, dust and black ink are grey
GREEN_SHARE = 0.75  # H&E absorb green most: green OD >= 0.75 x the largest channel's (pen ink does not)
MPP_TOLERANCE = 0.05  # the slide may be up to 5 % coarser than the model's µm/px
THUMBNAIL_CHUNK = 1024  # pixels per side read at once while building the thumbnail


class SlideError(ValueError):
    """A slide that cannot be used as asked; the message names the file."""


def _openslide() -> Any:
    try:
        import openslide
    except ImportError:
        raise SlideError(f"whole-slide prediction needs OpenSlide: {INSTALL_HINT}") from None
    return openslide


def open_slide(path: Path) -> Any:
    """An OpenSlide handle, or a SlideError naming the file when OpenSlide cannot read it."""
    openslide = _openslide()
    if not Path(path).is_file():
        raise SlideError(f"{path}: slide file not found")
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SlideError(f"{path}: OpenSlide cannot open this file ({text})") from None


def slide_mpp(slide: Any) -> float | None:
    """Level-0 µm per pixel from the slide's properties (mean of x and y), None when not stated."""
    try:
        x = float(slide.properties["openslide.mpp-x"])
        y = float(slide.properties.get("openslide.mpp-y", x))
    except (KeyError, ValueError):
        return None
    return (x + y) / 2 if x > 0 and y > 0 else None


def read_rgb(slide: Any, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    """A region (location at level 0, size at `level`) as H x W x 3 uint8, transparent pixels white."""
    region = slide.read_region(location, level, size)
    if region.getextrema()[3][0] < 255:  # outside the scanned area: OpenSlide returns transparent pixels
        region = Image.alpha_composite(Image.new("RGBA", region.size, (255, 255, 255, 255)), region)
    return np.asarray(region.convert("RGB"))


@dataclass(frozen=True)
class TilePlan:
    """How tiles are cut: read `read_size` px at `level`, resized to `image_size`; `tile` is the level-0 step."""

    level: int
    read_size: int
    tile: int
    image_size: int
    mpp: float | None  # µm per pixel of the model's input (None when the slide states none)
    how: str


def plan_tiles(
    slide: Any, path: Path, *, image_size: int, model_mpp: float | None, mpp: float | None = None,
    level: int | None = None, base_mpp: float | None = None,
) -> TilePlan:
    """Tile at `level` if given, else at `mpp` (or the model card's µm/px) from the slide's (or `base_mpp`) scale."""
    base = base_mpp or slide_mpp(slide)
    if level is not None:
        if not 0 <= level < slide.level_count:
            raise SlideError(f"{path}: level {level} does not exist (the slide has levels 0..{slide.level_count - 1})")
        ds = float(slide.level_downsamples[level])
        tile = round(image_size * ds)
        got = base * ds if base else None
        return TilePlan(level, image_size, tile, image_size, got, f"level {level} as asked (downsample {ds:g})")
    target = mpp or model_mpp
    if target is None:
        raise SlideError(f"{path}: the model card states no µm/px for its training images; "
                         "pass --mpp (µm/px to tile at) or --level")
    if base is None:
        raise SlideError(f"{path}: the slide states no µm/px (openslide.mpp-x); pass --slide-mpp or --level")
    scale = target / base  # level-0 pixels per model pixel
    if scale < 1 - MPP_TOLERANCE:
        raise SlideError(f"{path}: the model needs {target:g} µm/px but the slide's finest level is {base:g} µm/px "
                         "(it cannot provide that resolution)")
    downsamples = [float(d) for d in slide.level_downsamples]
    best = max(i for i, d in enumerate(downsamples) if d <= max(scale, 1.0) * (1 + 1e-6))
    # whole pixels of the level read: every tile corner then falls on a pixel of that level (OpenSlide
    # interpolates regions that start between pixels), at the cost of a µm/px within half a pixel of the target
    read = max(1, round(image_size * scale / downsamples[best]))
    tile = round(read * downsamples[best])
    return TilePlan(best, read, tile, image_size, base * tile / image_size,
                    f"{target:g} µm/px from a {base:g} µm/px slide: {read} px at level {best} → {image_size} px")


def thumbnail(slide: Any, max_side: int = 2048) -> tuple[np.ndarray, tuple[float, float]]:
    """The slide at most `max_side` px a side, from the nearest finer level in chunks; and level-0 px per pixel."""
    width, height = slide.dimensions
    d = max(width, height) / max_side
    tw, th = max(1, round(width / max(d, 1.0))), max(1, round(height / max(d, 1.0)))
    dx, dy = width / tw, height / th
    downsamples = [float(v) for v in slide.level_downsamples]
    level = max(i for i, v in enumerate(downsamples) if v <= min(dx, dy) * (1 + 1e-6))
    ds, (lw, lh) = downsamples[level], slide.level_dimensions[level]
    canvas = np.full((th, tw, 3), 255, np.uint8)
    for cy in range(0, lh, THUMBNAIL_CHUNK):
        for cx in range(0, lw, THUMBNAIL_CHUNK):
            cw, ch = min(THUMBNAIL_CHUNK, lw - cx), min(THUMBNAIL_CHUNK, lh - cy)
            x0, y0 = math.floor(cx * ds / dx), math.floor(cy * ds / dy)
            x1 = tw if cx + cw >= lw else math.floor((cx + cw) * ds / dx)
            y1 = th if cy + ch >= lh else math.floor((cy + ch) * ds / dy)
            if x1 <= x0 or y1 <= y0:
                continue
            region = read_rgb(slide, (round(cx * ds), round(cy * ds)), level, (cw, ch))
            canvas[y0:y1, x0:x1] = np.asarray(Image.fromarray(region).resize((x1 - x0, y1 - y0), Image.BOX))
    return canvas, (dx, dy)


_OD = (-np.log10(np.maximum(np.arange(256), 1) / 255.0)).astype(np.float32)  # uint8 intensity → optical density


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Beer–Lambert optical density per channel: -log10(I / 255), I clipped to >= 1 (a table lookup)."""
    return _OD[rgb]


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut maximising the between-class variance of a 1-D sample."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, float(values.max()) + 1e-6))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers) / np.maximum(w0, 1)
    m1 = ((hist * centers).sum() - np.cumsum(hist * centers)) / np.maximum(w1, 1)
    return float(centers[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))])


def tissue_mask(rgb: np.ndarray, rows: int = 256) -> np.ndarray:
    """H x W bool: stained tissue, background glass and pen marks out (see the module docstring).

    The thumbnail is box-blurred first (radius ~ side / 512): nuclei, lumens and fat then average into their
    tissue, so Otsu separates tissue from glass instead of nuclei from stroma. Computed in blocks of `rows`
    rows so the float temporaries stay small beside the thumbnail.
    """
    from PIL import ImageFilter

    radius = max(1, round(max(rgb.shape[:2]) / 512))
    rgb = np.asarray(Image.fromarray(rgb).filter(ImageFilter.BoxBlur(radius)))

    def channels(y: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        block = rgb[y : y + rows]
        return _OD[block[..., 0]], _OD[block[..., 1]], _OD[block[..., 2]]

    total = np.concatenate([sum(channels(y)) for y in range(0, len(rgb), rows)])
    threshold = max(otsu(total), MIN_OD)
    mask = np.empty(rgb.shape[:2], bool)
    for y in range(0, len(rgb), rows):
        r, g, b = channels(y)
        top = np.maximum(np.maximum(r, g), b)
        chroma = top - np.minimum(np.minimum(r, g), b)
        mask[y : y + rows] = (total[y : y + rows] > threshold) & (chroma > MIN_CHROMA) & (g >= GREEN_SHARE * top)
    return mask


@dataclass(frozen=True)
class TileGrid:
    """Tissue tiles on a level-0 grid of step `tile`: level-0 corners, grid cells (row, col) and the grid shape."""

    xy: np.ndarray  # N x 2 int64, level-0 top-left corners
    cells: np.ndarray  # N x 2 int64, (row, col) in the grid
    shape: tuple[int, int]  # rows, cols
    tile: int


def tissue_tiles(mask: np.ndarray, scale: tuple[float, float], dimensions: tuple[int, int], tile: int,
                 min_tissue: float = 0.5) -> TileGrid:
    """Full tiles of the level-0 grid whose thumbnail footprint is at least `min_tissue` tissue."""
    width, height = dimensions
    cols, rows = width // tile, height // tile
    if cols == 0 or rows == 0:
        return TileGrid(np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64), (rows, cols), tile)
    integral = np.pad(mask.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32), ((1, 0), (1, 0)))
    xs, ys = np.arange(cols) * tile, np.arange(rows) * tile

    def bounds(start: np.ndarray, step: float, size: int) -> tuple[np.ndarray, np.ndarray]:
        lo = np.clip(np.floor(start / step).astype(np.int64), 0, size - 1)
        hi = np.clip(np.ceil((start + tile) / step).astype(np.int64), lo + 1, size)
        return lo, hi

    x0, x1 = bounds(xs, scale[0], mask.shape[1])
    y0, y1 = bounds(ys, scale[1], mask.shape[0])
    inside = (integral[y1[:, None], x1[None]] - integral[y0[:, None], x1[None]]
              - integral[y1[:, None], x0[None]] + integral[y0[:, None], x0[None]])
    fraction = inside / ((y1 - y0)[:, None] * (x1 - x0)[None])
    rr, cc = np.nonzero(fraction >= min_tissue)
    return TileGrid(np.stack([xs[cc], ys[rr]], axis=1).astype(np.int64), np.stack([rr, cc], axis=1).astype(np.int64),
                    (rows, cols), tile)


class SlideTiles(SiteSplit):
    """Tiles of one slide read on demand (item i = (uint8 image_size² x 3 tile or None if unreadable, i)).

    A DataLoader batch is fetched through `__getitems__`: horizontally adjacent tiles of one grid row are
    read with ONE read_region call (at most MAX_RUN tiles) and cut apart, which divides OpenSlide's per-call
    cost by the run length (tissue tiles come in raster order, so runs are long).
    """

    MAX_RUN = 16

    def __init__(self, path: Path, xy: np.ndarray, plan: TilePlan) -> None:
        self.path = Path(path)
        self.xy = np.asarray(xy, dtype=np.int64)
        self.plan = plan
        self.labels = np.arange(len(self.xy), dtype=np.int64)  # the label is the tile's index
        self._slide: Any = None

    def _handle(self) -> Any:
        if self._slide is None:  # opened lazily: once per DataLoader worker
            self._slide = open_slide(self.path)
        return self._slide

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, int]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[np.ndarray | None, int]]:
        """Tiles for a batch of indices, in order; runs of neighbours on a row read at once."""
        out: list[tuple[np.ndarray | None, int]] = []
        start = 0
        while start < len(indices):
            end = start + 1
            while (end < len(indices) and end - start < self.MAX_RUN and indices[end] == indices[end - 1] + 1
                   and self.xy[indices[end], 1] == self.xy[indices[start], 1]
                   and self.xy[indices[end], 0] == self.xy[indices[end - 1], 0] + self.plan.tile):
                end += 1
            out += self._run(indices[start:end])
            start = end
        return out

    def _run(self, run: list[int]) -> list[tuple[np.ndarray | None, int]]:
        x, y = (int(v) for v in self.xy[run[0]])
        slide, size = self._handle(), self.plan.read_size
        ds = float(slide.level_downsamples[self.plan.level])
        try:
            width = round((int(self.xy[run[-1], 0]) - x) / ds) + size
            strip = read_rgb(slide, (x, y), self.plan.level, (width, size))
        except Exception as err:  # noqa: BLE001 - OpenSlide errors are skipped and counted like unreadable images
            log.warning("skipping %d unreadable tile(s) from (%d, %d) of %s: %s", len(run), x, y, self.path, err)
            return [(None, i) for i in run]
        tiles = []
        for k, i in enumerate(run):
            # the tile's offset in the strip, as OpenSlide would place a region read at its own corner
            left = round((int(self.xy[i, 0]) - x) / ds)
            tiles.append((to_square(np.ascontiguousarray(strip[:, left : left + size]), self.plan.image_size), i))
        return tiles

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_slide": None}
