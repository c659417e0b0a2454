"""Tissue primitives painted onto a canvas: two-layer glands, cell sheets, single-file cords, papillary fronds, fat, mucin, stroma cells."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import common.datasets.tissue.nuclei as nu
from common.datasets.tissue.canvas import (
    DENSE, EPI, FAT_WALL, MUCIN, MYXOID, RBC, SECRETION, STROMA, WHITE, Canvas, offset, resample,
)


@dataclass(frozen=True)
class Gland:
    """A lumen (wobbly, optionally bent ellipse) lined by a luminal layer and, when myo > 0, a myoepithelial layer."""

    cy: float  # centre, px
    cx: float
    ru: float  # lumen semi-axes, um (u = long axis)
    rv: float
    angle: float  # long-axis direction, rad
    luminal: float  # luminal layer thickness, um
    myo: float  # myoepithelial layer thickness, um (0: none, as in carcinoma)
    style: nu.Style
    bend: float = 0.0  # curvature of the long axis (slit-like, leaf-like channels)
    wobble: float = 0.05  # boundary irregularity
    cell: float = 8.0  # luminal cell width along the lumen, um
    secretion: bool = False  # pale pink secretion in the lumen


def _gland_frame(cv: Canvas, g: Gland, rng: np.random.Generator) -> tuple[np.ndarray, tuple[slice, slice], np.ndarray]:
    """(inside-lumen mask of the bounding box, the box, dense boundary curve in px)."""
    harmonics = rng.normal(0, g.wobble, 3)
    phases = rng.uniform(0, 2 * np.pi, 3)
    ru, rv = cv.px(max(g.ru, 0.8)), cv.px(max(g.rv, 0.8))
    bend = g.bend / max(ru, 1.0)
    ext = ru * (1 + 3 * g.wobble) + rv + abs(bend) * ru * ru + 2
    y0, x0 = int(min(cv.n, max(0, g.cy - ext))), int(min(cv.n, max(0, g.cx - ext)))
    y1, x1 = int(max(y0, min(cv.n, g.cy + ext + 1))), int(max(x0, min(cv.n, g.cx + ext + 1)))
    box = (slice(y0, y1), slice(x0, x1))
    ca, sa = np.cos(g.angle), np.sin(g.angle)

    def radius(theta: np.ndarray) -> np.ndarray:
        return 1.0 + sum(h * np.cos((k + 2) * theta + p) for k, (h, p) in enumerate(zip(harmonics, phases)))

    if y1 > y0 and x1 > x0:
        dy, dx = cv.yy[box] - g.cy, cv.xx[box] - g.cx
        u, v = dx * ca + dy * sa, -dx * sa + dy * ca
        vb = v - bend * u * u
        theta = np.arctan2(vb / rv, u / ru)
        inside = np.hypot(u / ru, vb / rv) < radius(theta)
    else:
        inside = np.zeros((y1 - y0, x1 - x0), bool)
    theta = np.linspace(0, 2 * np.pi, max(24, int(4 * (ru + rv))), endpoint=False)
    rho = radius(theta)
    u, vb = ru * rho * np.cos(theta), rv * rho * np.sin(theta)
    v = vb + bend * u * u
    curve = np.stack([g.cy + u * sa + v * ca, g.cx + u * ca - v * sa], 1)
    return inside, box, curve


def glands(cv: Canvas, rng: np.random.Generator, items: list[Gland], *, basement: bool = False) -> np.ndarray:
    """Paint lumens and their cell layers, add luminal and myoepithelial seeds; returns the glands' footprint."""
    lumen = np.zeros((cv.n, cv.n), bool)
    gid = np.zeros((cv.n, cv.n), np.int16)
    curves = []
    for k, g in enumerate(items):
        inside, box, curve = _gland_frame(cv, g, rng)
        lumen[box] |= inside
        gid[box][inside] = k
        curves.append(curve)
    if not items:
        return lumen
    dist, nearest = cv.distance_to(lumen)
    g_near = gid.ravel()[nearest]
    t1 = np.array([g.luminal for g in items], np.float32)[g_near]
    t2 = t1 + np.array([g.myo for g in items], np.float32)[g_near]
    layer = (dist > 0) & (dist <= t2)
    if basement:
        has_myo = np.array([g.myo > 0 for g in items])[g_near]
        cv.comp[(dist > t2) & (dist <= t2 + 0.9) & has_myo & (cv.comp == STROMA)] = DENSE
    cv.comp[layer] = EPI
    cv.comp[lumen] = WHITE
    wisps = cv.textures.crop(cv.textures.medium, rng)
    luminal, myo = [], []
    for k, (g, curve) in enumerate(zip(items, curves)):
        if g.secretion:
            cv.comp[(gid == k) & lumen & (wisps > 0.2)] = SECRETION
        lum, mye = _layer_seeds(cv, rng, curve, g)
        luminal.append(lum)
        myo.extend([mye] if mye is not None else [])
    for parts, styles in ((luminal, [g.style for g in items]), (myo, None)):
        if parts:
            _add_layer(cv, rng, parts, styles)
    return lumen | layer


def _add_layer(cv: Canvas, rng: np.random.Generator, parts: list[tuple[np.ndarray, np.ndarray]],
               styles: list[nu.Style] | None) -> None:
    """One nuclear draw per style for the seeds of many glands (styles None: myoepithelium)."""
    by_style: dict[nu.Style, list[tuple[np.ndarray, np.ndarray]]] = {}
    for k, part in enumerate(parts):
        by_style.setdefault(nu.MYOEPI if styles is None else styles[k], []).append(part)
    for style, group in by_style.items():
        pts = np.concatenate([p for p, _ in group])
        angle = np.concatenate([a for _, a in group])
        cv.add_seeds(pts[:, 0], pts[:, 1], nu.sample(style, rng, len(pts), angle))


def _layer_seeds(cv: Canvas, rng: np.random.Generator, curve: np.ndarray, g: Gland
                 ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """Luminal nuclei on a ring just outside the lumen (long axis radial), myoepithelial ones flat along its rim."""
    out = _outward_sign(curve)
    dense, tangent = resample(curve, 0.7, rng, closed=True, jitter=0.0)
    ring = offset(dense, tangent, out * cv.px(g.luminal * 0.5))
    pts, t = resample(ring, cv.px(g.cell), rng, closed=True)
    pts = offset(pts, t, out * cv.px(g.luminal * rng.uniform(-0.1, 0.1, len(pts))))
    luminal = (pts, t + np.pi / 2)
    if g.myo <= 0:
        return luminal, None
    outer = offset(dense, tangent, out * cv.px(g.luminal + g.myo * 0.5))
    return luminal, resample(outer, cv.px(g.cell * 1.8), rng, closed=True, jitter=0.4)


def _outward_sign(curve: np.ndarray) -> float:
    """+1 when the left normal of the closed curve points outwards (from the sign of its area, shoelace)."""
    y, x = curve[:, 0], curve[:, 1]
    area = float(np.dot(x, np.concatenate((y[1:], y[:1]))) - np.dot(y, np.concatenate((x[1:], x[:1]))))  # np.roll(·, -1)
    return 1.0 if area < 0 else -1.0


def pack(cv: Canvas, rng: np.random.Generator, radii_um: np.ndarray, gap_um: float, tries: int = 30) -> list[tuple[float, float, float]]:
    """Place non-overlapping discs (largest first); returns (cy px, cx px, r um) of those that fit."""
    radii = np.sort(np.asarray(radii_um, np.float64))[::-1]
    placed = np.zeros((0, 3))
    for r in radii:
        cand = rng.uniform(-0.3 * cv.px(r), cv.n + 0.3 * cv.px(r), (tries, 2))
        if len(placed):
            d = np.hypot(cand[:, None, 0] - placed[None, :, 0], cand[:, None, 1] - placed[None, :, 1]) * cv.px_um
            ok = np.all(d >= r + placed[None, :, 2] + gap_um, axis=1)
            if not ok.any():
                continue
            cand = cand[ok]
        placed = np.vstack([placed, [cand[0, 0], cand[0, 1], r]])
    return [tuple(row) for row in placed]


def _jittered_grid(cv: Canvas, rng: np.random.Generator, spacing_um: float,
                   jitter: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Points of a square grid of `spacing_um`, each moved by up to ±jitter of a step: (y, x) and their pixel indices."""
    step = cv.px(spacing_um)
    grid = np.arange(step / 2, cv.n, step)
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    gy = gy.ravel() + rng.uniform(-jitter, jitter, gy.size) * step
    gx = gx.ravel() + rng.uniform(-jitter, jitter, gx.size) * step
    return gy, gx, np.clip(gy.astype(int), 0, cv.n - 1), np.clip(gx.astype(int), 0, cv.n - 1)


def fill_cells(cv: Canvas, rng: np.random.Generator, mask: np.ndarray, style: nu.Style, spacing_um: float, *,
               angle: float | None = None, keep: float = 1.0, code: int = EPI) -> None:
    """Fill a region with a jittered grid of cells (sheets, nests, cribriform bridges)."""
    if not mask.any():
        return
    cv.comp[mask] = code
    gy, gx, iy, ix = _jittered_grid(cv, rng, spacing_um, 0.4)
    ok = mask[iy, ix] & (rng.random(gy.size) < keep)
    cv.add_seeds(gy[ok], gx[ok], nu.sample(style, rng, int(ok.sum()), angle))


def discs(cv: Canvas, centres: np.ndarray, radius_um: np.ndarray, code: int) -> None:
    """Paint small discs (discohesive single cells) into compartment `code`."""
    r = cv.px(np.asarray(radius_um, np.float32))
    r = np.broadcast_to(r, (len(centres),))
    for (cy, cx), rr in zip(centres, r):
        y0, y1 = int(max(0, cy - rr - 1)), int(min(cv.n, cy + rr + 2))
        x0, x1 = int(max(0, cx - rr - 1)), int(min(cv.n, cx + rr + 2))
        if y1 <= y0 or x1 <= x0:
            continue
        box = (slice(y0, y1), slice(x0, x1))
        inside = (cv.yy[box] - cy) ** 2 + (cv.xx[box] - cx) ** 2 <= rr * rr
        cv.comp[box][inside] = code


def wavy_line(cv: Canvas, rng: np.random.Generator, angle: float, *, amplitude_um: float, wavelength_um: float,
              through: tuple[float, float] | None = None) -> np.ndarray:
    """A dense curve (M x 2, y/x px) crossing the patch at `angle`, with a sinusoidal wiggle."""
    cy, cx = through if through is not None else rng.uniform(0, cv.n, 2)
    half = cv.n * 0.85
    t = np.linspace(-half, half, int(4 * half))
    wiggle = cv.px(amplitude_um) * np.sin(2 * np.pi * t / cv.px(wavelength_um) + rng.uniform(0, 2 * np.pi))
    wiggle += cv.px(amplitude_um) * 0.5 * np.sin(2 * np.pi * t / cv.px(wavelength_um * 2.7) + rng.uniform(0, 2 * np.pi))
    ca, sa = np.cos(angle), np.sin(angle)
    return np.stack([cy + t * sa + wiggle * ca, cx + t * ca - wiggle * sa], 1)


def cords(cv: Canvas, rng: np.random.Generator, curves: list[np.ndarray], style: nu.Style, spacing_um: float,
          cell_um: float, keep: float = 0.85) -> None:
    """Single-file ('Indian file') lines of discohesive cells along curves."""
    for curve in curves:
        pts, tangent = resample(curve, cv.px(spacing_um), rng, closed=False, jitter=0.2)
        inside = (pts[:, 0] > -5) & (pts[:, 0] < cv.n + 5) & (pts[:, 1] > -5) & (pts[:, 1] < cv.n + 5)
        pts, tangent = pts[inside], tangent[inside]
        pts = pts + rng.normal(0, cv.px(0.8), pts.shape)
        pts = pts[rng.random(len(pts)) < keep]
        discs(cv, pts, cell_um / 2 * rng.uniform(0.85, 1.15, len(pts)), EPI)
        cv.add_seeds(pts[:, 0], pts[:, 1], nu.sample(style, rng, len(pts)))


def fronds(cv: Canvas, rng: np.random.Generator, curves: list[np.ndarray], *, core_um: float, epi_um: float,
           rows: int, style: nu.Style, cell_um: float, myo: float = 0.0, vessel: bool = True) -> None:
    """Papillae: fibrovascular stromal cores along curves, lined by `rows` rows of epithelium (and myoepithelium)."""
    skeleton = np.zeros((cv.n, cv.n), bool)
    for curve in curves:
        skeleton |= cv.raster_curve(curve)
    dist, _ = cv.distance_to(skeleton)
    cv.comp[dist < core_um + epi_um + myo] = EPI
    cv.comp[dist < core_um] = STROMA
    if vessel:
        cv.comp[(dist < 1.6) & (cv.textures.crop(cv.textures.smooth, rng) > 0.3)] = RBC
    for curve in curves:
        pts, tangent = resample(curve, cv.px(cell_um), rng, closed=False)
        for side in (1.0, -1.0):
            for row in range(rows):
                depth = core_um + myo + epi_um * (row + 0.5) / rows
                p = offset(pts, tangent, side * cv.px(depth * rng.uniform(0.85, 1.15, len(pts))))
                cv.add_seeds(p[:, 0], p[:, 1], nu.sample(style, rng, len(p), tangent + np.pi / 2))
            if myo > 0:
                mp = offset(pts[::2], tangent[::2], side * cv.px(core_um + myo * 0.5))
                cv.add_seeds(mp[:, 0], mp[:, 1], nu.sample(nu.MYOEPI, rng, len(mp), tangent[::2]))


def fat(cv: Canvas, rng: np.random.Generator, mask: np.ndarray, cell_um: float, wall_um: float = 0.7) -> None:
    """Adipocytes: a jittered-grid Voronoi of large empty cells with thin eosinophilic walls inside `mask`."""
    if not mask.any():
        return
    s = cv.px(cell_um)
    g = int(np.ceil(cv.n / s)) + 3
    jy, jx = rng.uniform(-0.35, 0.35, (2, g, g)) * s
    ys, xs = cv.yy[mask], cv.xx[mask]
    gi, gj = (ys / s).astype(int) + 1, (xs / s).astype(int) + 1
    best = np.full(ys.shape, 1e9, np.float32)
    second = np.full(ys.shape, 1e9, np.float32)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            ii, jj = gi + di, gj + dj
            sy = (ii - 1 + 0.5) * s + jy[ii, jj]
            sx = (jj - 1 + 0.5) * s + jx[ii, jj]
            d = np.hypot(ys - sy, xs - sx)
            second = np.where(d < best, best, np.minimum(second, d))
            best = np.minimum(best, d)
    wall = (second - best) * cv.px_um < 2 * wall_um
    codes = np.where(wall, FAT_WALL, WHITE).astype(np.uint8)
    cv.comp[mask] = codes


def mucin(cv: Canvas, mask: np.ndarray) -> None:
    """Extracellular mucin lakes (pale blue-grey, wispy)."""
    cv.comp[mask] = MUCIN


def myxoid(cv: Canvas, mask: np.ndarray) -> None:
    """Loose, pale, bluish (myxoid) stroma, as in many fibroadenomas."""
    cv.comp[mask & (cv.comp == STROMA)] = MYXOID


def stroma_cells(cv: Canvas, rng: np.random.Generator, *, density: float, angle: float, lymphocytes: float,
                 style: nu.Style = nu.FIBROBLAST, spacing_um: float = 11.0) -> None:
    """Fibroblast nuclei along the fibres and scattered lymphocytes, wherever the canvas is still stroma."""
    gy, gx, iy, ix = _jittered_grid(cv, rng, spacing_um, 0.5)
    where = cv.where(STROMA, MYXOID, DENSE)[iy, ix]
    draw = rng.random(gy.size)
    fib = where & (draw < density)
    lym = where & (draw >= density) & (draw < density + lymphocytes)
    cv.add_seeds(gy[fib], gx[fib], nu.sample(style, rng, int(fib.sum()), angle))
    cv.add_seeds(gy[lym], gx[lym], nu.sample(nu.LYMPHOCYTE, rng, int(lym.sum())))


def edge(cv: Canvas, rng: np.random.Generator, share: float) -> None:
    """Glass beyond a wavy tissue edge covering about `share` of the patch."""
    if share <= 0.01:
        return
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (cv.xx * np.cos(angle) + cv.yy * np.sin(angle)) / cv.n
    field = ramp + 0.08 * cv.textures.crop(cv.textures.coarse, rng)
    glass = cv.threshold(field, share)
    cv.comp[glass] = WHITE
    cv.drop_seeds(glass)


def inflammation(cv: Canvas, rng: np.random.Generator, share: float) -> None:
    """Lymphocytes (with some fibroblasts) scattered and clustered in the stroma until nuclei cover `share` more."""
    stroma = np.flatnonzero(cv.where(STROMA, MYXOID, DENSE).ravel())
    if stroma.size == 0:
        return
    count = int(share * cv.field_um**2 / (np.pi * 3.0**2))
    count = min(count, stroma.size // int(max(1, cv.px(6.0) ** 2)))
    if count <= 0:
        return
    hubs = rng.choice(stroma, size=max(1, count // 12))
    picks = np.where(rng.random(count) < 0.5, rng.choice(hubs, count), rng.choice(stroma, count))
    y = picks // cv.n + rng.normal(0, cv.px(6.0), count) * (rng.random(count) < 0.5)
    x = picks % cv.n + rng.normal(0, cv.px(6.0), count) * (rng.random(count) < 0.5)
    iy, ix = np.clip(y.astype(int), 0, cv.n - 1), np.clip(x.astype(int), 0, cv.n - 1)
    ok = cv.where(STROMA, MYXOID, DENSE)[iy, ix]
    lym = rng.random(count) < 0.75
    cv.add_seeds(y[ok & lym], x[ok & lym], nu.sample(nu.LYMPHOCYTE, rng, int((ok & lym).sum())))
    cv.add_seeds(y[ok & ~lym], x[ok & ~lym], nu.sample(nu.FIBROBLAST, rng, int((ok & ~lym).sum()), rng.uniform(0, np.pi)))


def capillary(cv: Canvas, rng: np.random.Generator) -> None:
    """A small vessel in the stroma: a thin wavy channel packed with red blood cells."""
    line = wavy_line(cv, rng, rng.uniform(0, np.pi), amplitude_um=rng.uniform(2, 8), wavelength_um=rng.uniform(40, 90))
    line = line[: int(len(line) * rng.uniform(0.3, 0.6))] if rng.random() < 0.5 else line[-int(len(line) * 0.4):]
    dist, _ = cv.distance_to(cv.raster_curve(line))
    cv.comp[(dist < rng.uniform(1.5, 3.0)) & cv.where(STROMA, MYXOID)] = RBC
