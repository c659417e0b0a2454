"""What slide prediction writes: tiles.csv rows, the heatmap over the thumbnail, and QuPath-ready GeoJSON.

GeoJSON follows QuPath's import format (QuPath 0.4+ reads `classification.color` = [r, g, b]; 0.2/0.3 read
`colorRGB`, a packed ARGB int; both are written): above-threshold tiles as `detection` objects with their
probabilities as measurements, and per class the merged region they form as one `annotation`
(a MultiPolygon traced along tile edges, holes kept). Coordinates are level-0 pixels.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

QUPATH_COLOURS: dict[str, tuple[int, int, int]] = {  # class → RGB; others get a colour from a fixed palette
    "malignant": (200, 0, 0), "benign": (0, 150, 60), "ductal_carcinoma": (200, 0, 0),
    "lobular_carcinoma": (230, 120, 0), "mucinous_carcinoma": (160, 0, 160), "papillary_carcinoma": (220, 0, 120),
    "adenosis": (0, 150, 60), "fibroadenoma": (0, 120, 200), "phyllodes_tumor": (90, 160, 0),
    "tubular_adenoma": (0, 170, 170),
}
HEATMAP_SIDE = 1024  # thumbnail pixels (at most) behind the heatmap
MALIGNANT = frozenset({"malignant", "ductal_carcinoma", "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma"})


def positive_probability(probs: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """P(malignant) per row: the malignant column, or the sum over malignant subtypes (8 classes)."""
    cols = [i for i, name in enumerate(class_names) if name in MALIGNANT]
    return probs[:, cols].sum(axis=1) if cols else probs.max(axis=1)


class TileCsv:
    """tiles.csv written as batches arrive: x, y (level 0), width, height, p_<class>..., predicted, model-data."""

    def __init__(self, fh: IO[str], class_names: Sequence[str], data_kind: str) -> None:
        self.writer = csv.writer(fh)
        self.class_names = list(class_names)
        self.data_kind = data_kind
        self.rows = 0
        self.writer.writerow(["x", "y", "width", "height", *[f"p_{c}" for c in class_names], "predicted", "model-data"])

    def add(self, xy: np.ndarray, tile: int, probs: np.ndarray) -> None:
        """One batch of tiles (level-0 corners) and their probabilities."""
        for (x, y), p in zip(xy, probs):
            self.writer.writerow([int(x), int(y), tile, tile, *[f"{v:.6f}" for v in p],
                                  self.class_names[int(np.argmax(p))], self.data_kind])
        self.rows += len(xy)


def heatmap(thumb: np.ndarray, grid: np.ndarray, tile: int, scale: tuple[float, float], path: Path, *,
            title: str) -> Path:
    """P(malignant) (grid: rows x cols of tiles, NaN where no tissue) over the thumbnail, a title and a colour bar.

    Drawn with PIL (inferno colour map, 60 % opacity over tissue tiles; the tissue shows through).
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    step = max(1, -(-max(thumb.shape[:2]) // HEATMAP_SIDE))
    back = thumb[::step, ::step].astype(np.float32)
    h, w = back.shape[:2]
    rows = np.minimum((np.arange(h) * step * scale[1] // tile).astype(np.int64), grid.shape[0])
    cols = np.minimum((np.arange(w) * step * scale[0] // tile).astype(np.int64), grid.shape[1])
    padded = np.pad(grid, ((0, 1), (0, 1)), constant_values=np.nan)  # index rows/cols past the grid → NaN
    values = padded[rows[:, None], cols[None, :]]
    lut = (colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)
    shown = np.isfinite(values)
    colour = lut[(np.nan_to_num(values) * 255).clip(0, 255).astype(np.int64)]
    back[shown] = 0.4 * back[shown] + 0.6 * colour[shown]
    font = _font(14)
    bar_w, pad, head = 24, 12, 30
    canvas = Image.new("RGB", (w + bar_w + 4 * pad + 40, h + head + pad), "white")
    canvas.paste(Image.fromarray(back.astype(np.uint8)), (pad, head))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 8), title.replace("—", "-"), fill="black", font=font)  # the bundled font has no dash
    x0 = w + 2 * pad
    ramp = lut[np.linspace(255, 0, h).astype(np.int64)][:, None, :].repeat(bar_w, axis=1)
    canvas.paste(Image.fromarray(ramp.astype(np.uint8)), (x0, head))
    for value in (0.0, 0.5, 1.0):
        y = head + round((1 - value) * (h - 1))
        draw.line([(x0 + bar_w, y), (x0 + bar_w + 4, y)], fill="black")
        draw.text((x0 + bar_w + 6, y - 7), f"{value:g}", fill="black", font=font)
    canvas.save(path)
    return path


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def qupath_class(name: str) -> dict[str, Any]:
    """A QuPath classification object: name, color [r, g, b] (0.4+) and colorRGB packed ARGB (0.2/0.3)."""
    r, g, b = QUPATH_COLOURS.get(name, (120, 120, 120))
    packed = (0xFF << 24) | (r << 16) | (g << 8) | b
    return {"name": name, "color": [r, g, b], "colorRGB": packed - (1 << 32)}  # Java int: signed 32 bit


def detections(xy: np.ndarray, tile: int, probs: np.ndarray, class_names: Sequence[str], threshold: float,
               data_kind: str) -> list[dict[str, Any]]:
    """Tiles with P(malignant) >= threshold as QuPath detections, classified by their likeliest malignant class."""
    positive = positive_probability(probs, class_names)
    malignant = [i for i, c in enumerate(class_names) if c in MALIGNANT] or list(range(len(class_names)))
    keep = np.nonzero(positive >= threshold)[0]
    names = [class_names[malignant[j]] for j in np.argmax(probs[keep][:, malignant], axis=1)]
    rounded, p_rounded = probs[keep].round(6).tolist(), positive[keep].round(6).tolist()
    keys = [f"p_{c}" for c in class_names]
    return [_feature({"type": "Polygon", "coordinates": [_square(int(xy[k, 0]), int(xy[k, 1]), tile)]}, "detection",
                     name, data_kind, {"P(malignant)": p, **dict(zip(keys, row))})
            for k, name, row, p in zip(keep, names, rounded, p_rounded)]


def regions(cells_by_class: dict[str, np.ndarray], shape: tuple[int, int], tile: int,
            data_kind: str) -> list[dict[str, Any]]:
    """Per class, its tiles (grid cells row, col) merged into one MultiPolygon annotation in level-0 pixels."""
    out = []
    for name, cells in cells_by_class.items():
        if len(cells) == 0:
            continue
        mask = np.zeros(shape, bool)
        mask[cells[:, 0], cells[:, 1]] = True
        polygons = [[[[x * tile, y * tile] for x, y in ring] for ring in poly] for poly in trace(mask)]
        out.append(_feature({"type": "MultiPolygon", "coordinates": polygons}, "annotation", name, data_kind,
                            {"tiles": int(len(cells)), "area-px": int(len(cells)) * tile * tile}))
    return out


def write_geojson(path: Path, features: list[dict[str, Any]], *, data_kind: str, model: str) -> Path:
    """A FeatureCollection (foreign member `properties` says which model and data kind made it)."""
    body = {"type": "FeatureCollection", "properties": {"model-data": data_kind, "model": model},
            "features": features}
    path.write_text(json.dumps(body))
    return path


def _feature(geometry: dict[str, Any], kind: str, name: str, data_kind: str,
             measurements: dict[str, float]) -> dict[str, Any]:
    return {"type": "Feature", "geometry": geometry, "properties": {
        "objectType": kind, "classification": qupath_class(name), "isLocked": False,
        "measurements": measurements, "model-data": data_kind}}


def _square(x: int, y: int, t: int) -> list[list[int]]:
    return [[x, y], [x + t, y], [x + t, y + t], [x, y + t], [x, y]]


def trace(mask: np.ndarray) -> list[list[list[tuple[int, int]]]]:
    """Polygons (exterior ring, then holes; closed rings of grid corners x, y) outlining the True cells.

    Every cell edge between a True and a False cell becomes a directed edge with the True cell on its right
    (in image coordinates, y down); edges are chained into rings, turning right first at corners where two
    cells touch diagonally, so such cells stay separate. Exteriors have positive shoelace area, holes negative.
    """
    padded = np.pad(mask, 1)
    m = padded[1:-1, 1:-1]
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    sides = (  # neighbour offset (drow, dcol), edge start and end corner offsets (dx, dy)
        ((-1, 0), (0, 0), (1, 0)), ((0, 1), (1, 0), (1, 1)), ((1, 0), (1, 1), (0, 1)), ((0, -1), (0, 1), (0, 0)),
    )
    for (dr, dc), (sx, sy), (ex, ey) in sides:
        neighbour = padded[1 + dr:padded.shape[0] - 1 + dr, 1 + dc:padded.shape[1] - 1 + dc]
        for r, c in zip(*np.nonzero(m & ~neighbour)):
            edges.setdefault((int(c) + sx, int(r) + sy), []).append((int(c) + ex, int(r) + ey))
    rings = []
    while edges:
        start = next(iter(edges))
        ring, here, heading = [start], start, None
        while True:
            outs = edges[here]
            nxt = outs[0] if len(outs) == 1 or heading is None else min(outs, key=lambda p: _turn(heading, here, p))
            outs.remove(nxt)
            if not outs:
                del edges[here]
            heading = (nxt[0] - here[0], nxt[1] - here[1])
            here = nxt
            ring.append(here)
            if here == start:
                break
        rings.append(_simplify(ring))
    outer = [r for r in rings if _area(r) > 0]
    holes = [r for r in rings if _area(r) < 0]
    polygons = [[r] for r in outer]
    for hole in holes:
        (ax, ay), (bx, by) = hole[0], hole[1]
        # the hole (False cells) lies left of its edges: a point just left of the first edge's midpoint
        px, py = (ax + bx) / 2 + (by - ay) * 0.25, (ay + by) / 2 - (bx - ax) * 0.25
        owners = [p for p in polygons if _contains(p[0], px, py)]
        if owners:
            min(owners, key=lambda p: _area(p[0])).append(hole)
    return polygons


def _turn(heading: tuple[int, int], here: tuple[int, int], nxt: tuple[int, int]) -> int:
    """0 for a right turn, 1 straight on, 2 left (image coordinates, y down)."""
    d = (nxt[0] - here[0], nxt[1] - here[1])
    right = (-heading[1], heading[0])
    return 0 if d == right else (1 if d == heading else 2)


def _simplify(ring: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop corners where the ring goes straight on (the ring stays closed)."""
    pts = ring[:-1]
    keep = [p for i, p in enumerate(pts)
            if (p[0] - pts[i - 1][0]) * (pts[(i + 1) % len(pts)][1] - p[1])
            != (p[1] - pts[i - 1][1]) * (pts[(i + 1) % len(pts)][0] - p[0])]
    return keep + keep[:1]


def _area(ring: list[tuple[int, int]]) -> float:
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, ring[1:]))


def _contains(ring: list[tuple[int, int]], px: float, py: float) -> bool:
    inside = False
    for (x0, y0), (x1, y1) in zip(ring, ring[1:]):
        if (y0 > py) != (y1 > py) and px < x0 + (py - y0) * (x1 - x0) / (y1 - y0):
            inside = not inside
    return inside
