"""Nuclear styles (benign, myoepithelial, stromal, carcinoma by grade, lobular) and the nucleus painter.

Cells are the Voronoi regions of their seeds (an exact pixel Voronoi from one distance transform);
each nucleus is a soft-edged, irregular ellipse with chromatin texture, optional vesicular rim,
nucleolus or mitotic figure, drawn inside its own cell.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from common.datasets.tissue.canvas import Canvas


@dataclass(frozen=True)
class Style:
    """How one kind of cell's nuclei look (sizes in micrometres)."""

    diameter: float  # long-axis mean
    cv: float  # relative sd of size (pleomorphism)
    aspect: tuple[float, float]  # long/short axis ratio range
    dark: float  # haematoxylin concentration
    ves: float  # vesicular chromatin (pale centre, dark rim, clumps) 0..1
    nucleolus: float  # share of nuclei with a visible nucleolus
    irr: float  # contour irregularity
    mitosis: float = 0.0  # share in mitosis
    cyto: float = 0.28  # cytoplasm eosin
    halo: float = 0.0  # perinuclear clearing 0..1
    visible: float = 0.92  # share of cells whose nucleus is in the section plane

    def scaled(self, size: float = 1.0, dark: float = 1.0) -> Style:
        """The same style with nuclei size x `size` and darkness x `dark` (a patient's random effect)."""
        return replace(self, diameter=self.diameter * size, dark=self.dark * dark)


LUMINAL = Style(7.8, 0.09, (1.0, 1.35), 0.78, 0.08, 0.04, 0.04, 0.001, cyto=0.18)
CROWDED = Style(7.8, 0.13, (1.2, 1.8), 0.80, 0.10, 0.05, 0.06, 0.002, cyto=0.17)  # usual ductal hyperplasia
MYOEPI = Style(10.0, 0.12, (2.0, 2.7), 0.95, 0.0, 0.0, 0.05, cyto=0.16, halo=0.6)
FIBROBLAST = Style(11.0, 0.20, (3.0, 4.5), 0.80, 0.0, 0.0, 0.10, visible=1.0)
LYMPHOCYTE = Style(6.0, 0.07, (1.0, 1.15), 1.15, 0.0, 0.0, 0.03, visible=1.0)
LOBULAR = Style(7.2, 0.10, (1.0, 1.3), 0.80, 0.12, 0.06, 0.05, 0.002, cyto=0.16, halo=0.3)
PAPILLARY = Style(8.6, 0.14, (1.5, 2.2), 0.85, 0.20, 0.20, 0.08, 0.006, cyto=0.17)


def carcinoma(grade: float) -> Style:
    """Ductal-type carcinoma nuclei: grade 1 is barely bigger than benign; grade 3 large, vesicular, nucleolated."""
    g = float(np.clip(grade, 1.0, 3.0)) - 1.0  # 0 .. 2
    return Style(
        diameter=8.2 + 2.0 * g, cv=0.14 + 0.07 * g, aspect=(1.0, 1.45 + 0.15 * g), dark=0.74 + 0.04 * g,
        ves=0.25 + 0.25 * g, nucleolus=0.30 + 0.30 * g, irr=0.07 + 0.05 * g, mitosis=0.006 + 0.012 * g,
        cyto=0.17,
    )


def sample(style: Style, rng: np.random.Generator, count: int, angle: float | np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-cell nuclear attributes (canvas.SEED_FIELDS but y/x) for `count` cells of a style."""
    z = rng.standard_normal((3, count)).astype(np.float32)
    u = rng.random((11, count), dtype=np.float32)
    size = style.diameter * np.clip(1.0 + style.cv * z[0], 0.45, 2.2)
    aspect = style.aspect[0] + (style.aspect[1] - style.aspect[0]) * u[0]
    mitosis = u[1] < style.mitosis
    a = size / 2
    b = a / aspect
    theta = u[2] * np.pi if angle is None else np.asarray(angle, np.float32) + 0.15 * z[1]
    dark = style.dark * np.clip(1.0 + 0.1 * z[2], 0.6, 1.5)
    nucleolus = (u[3] < style.nucleolus) & ~mitosis
    any_mitosis = bool(mitosis.any())

    def pick(in_mitosis: float | np.ndarray, otherwise: np.ndarray) -> np.ndarray:
        return np.where(mitosis, in_mitosis, otherwise) if any_mitosis else otherwise

    return {
        "a": pick(a * 0.9, a), "b": pick(b * 0.45, b),
        "angle": np.broadcast_to(theta, (count,)),
        "dark": pick(dark * 1.7, dark), "ves": pick(0.0, style.ves * (0.6 + 0.7 * u[4])),
        "nucleolus": np.where(nucleolus, (0.7 + 0.6 * u[5]) * (0.8 + 0.025 * size), 0.0),
        "irr": pick(0.35, style.irr * (0.5 + u[6])),
        "lobes": pick(7.0, 2.0 + np.floor(3.0 * u[7])), "phase": u[8] * (2 * np.pi),
        "mitosis": mitosis.astype(np.float32), "cyto": style.cyto * (0.85 + 0.3 * u[9]),
        "visible": ((u[10] < style.visible) | mitosis).astype(np.float32),
        "halo": pick(0.8, style.halo * (0.5 + u[7])),
    }


@dataclass
class Nuclei:
    """What the painter returns: nuclear coverage and stain, cell ownership and membranes."""

    cover: np.ndarray  # 0..1 nucleus coverage
    h: np.ndarray  # haematoxylin inside nuclei
    e: np.ndarray  # eosin inside nuclei
    halo: np.ndarray  # perinuclear clearing 0..1
    owner: np.ndarray  # seed index of each pixel's cell (-1 without seeds)
    membrane: np.ndarray  # bool: a cell border runs through this pixel
    cyto: np.ndarray  # the owning cell's cytoplasm eosin


_PAD = 6  # seeds just outside the patch still own (and draw) the pixels next to the edge


def paint(cv: Canvas, table: dict[str, np.ndarray], crisp: float) -> Nuclei:
    """Voronoi cells of the seeds and their nuclei; crisp (0..1, fixation) scales the chromatin texture."""
    n = cv.n
    zeros = np.zeros((n, n), np.float32)
    count = table["y"].size
    if count == 0:
        return Nuclei(zeros, zeros, zeros, zeros, np.full((n, n), -1), np.zeros((n, n), bool), zeros)
    m = n + 2 * _PAD
    iy = np.clip(np.round(table["y"]).astype(int) + _PAD, 0, m - 1)
    ix = np.clip(np.round(table["x"]).astype(int) + _PAD, 0, m - 1)
    label = np.full((m, m), -1, np.int32)
    label[iy, ix] = np.arange(count, dtype=np.int32)
    ny, nx = ndimage.distance_transform_edt(label < 0, return_distances=False, return_indices=True)
    owner = label[ny, nx][_PAD : _PAD + n, _PAD : _PAD + n]
    membrane = np.zeros((n, n), bool)
    membrane[:, :-1] |= owner[:, :-1] != owner[:, 1:]
    membrane[:-1, :] |= owner[:-1, :] != owner[1:, :]

    # per-cell quantities once per seed, then gathered (elementwise, so the same values as per pixel)
    per_cell = {"y": table["y"], "x": table["x"], "ca": np.cos(table["angle"]), "sa": np.sin(table["angle"]),
          "a_px": table["a"] / cv.px_um, "b_px": table["b"] / cv.px_um, "irr": table["irr"], "lobes": table["lobes"],
          "phase": table["phase"], "visible": table["visible"], "halo": table["halo"]}
    get = dict(zip(per_cell, np.take(np.stack(list(per_cell.values())), owner, axis=1)))  # one gather for every attribute
    dy, dx = cv.yy - get["y"], cv.xx - get["x"]
    ca, sa, a_px, b_px = get["ca"], get["sa"], get["a_px"], get["b_px"]
    u, v = (dx * ca + dy * sa) / a_px, (-dx * sa + dy * ca) / b_px
    q = np.sqrt(u * u + v * v)
    r = 1.0 + get["irr"] * np.sin(get["lobes"] * np.arctan2(v, u) + get["phase"])
    cover = np.clip((r - q) * b_px * 1.1 + 0.5, 0.0, 1.0) * get["visible"]
    tex = cv.textures.crop(cv.textures.fine, cv.rng) * crisp
    halo = get["halo"] * np.clip(1.6 - q, 0.0, 0.6) / 0.6 * (q >= 0.95)
    # chromatin only where a nucleus covers the pixel: elsewhere cover is 0 and its stain is never seen
    sel = np.flatnonzero(cover > 0)
    cell = owner.ravel()[sel]
    u, v, q, r, tex_s = u.ravel()[sel], v.ravel()[sel], q.ravel()[sel], r.ravel()[sel], tex.ravel()[sel]
    a_px, b_px = a_px.ravel()[sel], b_px.ravel()[sel]
    dark, ves, nucleolus = table["dark"][cell], table["ves"][cell], table["nucleolus"][cell]
    rel = q / np.maximum(r, 0.3)
    rim = np.clip(1.0 - np.abs(rel - 0.82) / 0.2, 0.0, 1.0)
    clumps = np.clip(tex_s - 0.6, 0.0, None)
    solid = 0.86 + 0.22 * tex_s
    vesicular = 0.50 + 0.55 * rim + 0.55 * clumps
    h_s = dark * ((1 - ves) * solid + ves * vesicular)
    # nucleolus: a small dark-magenta dot off centre (its offset follows the cell's phase)
    phase = table["phase"][cell]
    no_u, no_v = 0.25 * np.cos(phase), 0.25 * np.sin(phase)
    dist = np.hypot((u - no_u) * a_px, (v - no_v) * b_px) * cv.px_um
    spot = np.clip(1.0 - dist / np.maximum(nucleolus, 1e-3), 0.0, 1.0) * (nucleolus > 0)
    h_s = h_s + 0.55 * dark * spot
    e_s = 0.06 + 0.30 * spot
    mitotic = table["mitosis"][cell] > 0
    if mitotic.any():
        h_s = np.where(mitotic, dark * (0.75 + 0.45 * np.clip(tex_s + 0.5, 0, 1.5)), h_s)
    h, e = np.zeros(n * n, np.float32), np.zeros(n * n, np.float32)
    h[sel], e[sel] = h_s, e_s
    return Nuclei(cover.astype(np.float32), h.reshape(n, n), e.reshape(n, n), halo.astype(np.float32),
                  owner, membrane, table["cyto"][owner].astype(np.float32))


DARK_CHROMATIN = 0.45  # haematoxylin concentration of an output pixel counted as dark chromatin


def dark_blocks(nuc: Nuclei, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Dark chromatin at the output resolution (block means of the hi-res nuclei) and each block's owner cell."""
    mass = nuc.cover * nuc.h
    n = mass.shape[0] // factor
    low = mass.reshape(n, factor, n, factor).mean(axis=(1, 3)) if factor > 1 else mass
    return low > DARK_CHROMATIN, nuc.owner[factor // 2 :: factor, factor // 2 :: factor][:n, :n]


def dark_share(nuc: Nuclei, factor: int) -> float:
    """Share of the output patch that is dark chromatin (what a dark-pixel or nuclear-area count sees)."""
    return float(dark_blocks(nuc, factor)[0].mean())


def thin(nuc: Nuclei, target: float, factor: int, rng: np.random.Generator,
         dark: tuple[np.ndarray, np.ndarray] | None = None) -> Nuclei:
    """Hide whole nuclei, drawn at random, until dark chromatin covers at most `target` of the output patch
    (`dark`: dark_blocks(nuc, factor) when the caller has it)."""
    dark, owner = dark_blocks(nuc, factor) if dark is None else dark
    excess = int(dark.sum() - target * dark.size)
    if excess <= 0 or nuc.owner.max() < 0:
        return nuc
    counts = np.bincount(owner[dark], minlength=int(nuc.owner.max()) + 1)
    order = rng.permutation(counts.size)
    hidden = np.zeros(counts.size, bool)
    hidden[order[np.cumsum(counts[order]) <= excess]] = True
    gone = hidden[np.maximum(nuc.owner, 0)] & (nuc.owner >= 0)
    return replace(nuc, cover=np.where(gone, 0.0, nuc.cover).astype(np.float32))


def level(nuc: Nuclei, darkness: float) -> Nuclei:
    """Rank-preserving remap of the nuclear haematoxylin onto one class-independent range (darkness x 0.5 .. 1.15).

    Spatial chromatin patterns survive (rims, clumps, nucleoli and mitoses stay where and as dark
    relative to the rest as they were); what a tone histogram sees no longer depends on the lesion.
    """
    inside = nuc.cover > 0.3
    values = nuc.h[inside]
    if values.size < 2:
        return nuc
    ranks = np.empty(values.size, np.float32)
    ranks[stable_order(values)] = np.linspace(0.0, 1.0, values.size, dtype=np.float32)
    h = nuc.h.copy()
    h[inside] = darkness * (0.5 + 0.65 * ranks)
    return replace(nuc, h=h)


def stable_order(values: np.ndarray) -> np.ndarray:
    """np.argsort(values, kind="stable") of finite float32 values, by one unstable sort of unique int64 keys (faster)."""
    bits = (values + np.float32(0.0)).view(np.int32).astype(np.int64)  # + 0.0: -0.0 ties with 0.0, as in argsort
    bits ^= (bits >> 31) & 0x7FFFFFFF  # IEEE order → integer order, negatives included
    keys = (bits << 32) | np.arange(values.size, dtype=np.int64)
    return (np.sort(keys) & 0xFFFFFFFF).astype(np.intp)


MORPHOMETRY = ("nuclei per 1e4 um²", "mean nuclear area", "nuclear area cv", "vesicular chromatin", "nucleolated share",
               "mitotic share", "dark chromatin share")
MIN_NUCLEUS_UM2 = 4.0  # smaller visible fragments are not counted as nuclei


def morphometry(nuc: Nuclei, table: dict[str, np.ndarray], px_um: float, factor: int) -> np.ndarray:
    """What a nucleus segmentation of the painted patch measures (MORPHOMETRY order; zeros without nuclei).

    Areas are each cell's visible nuclear coverage (after thinning) in um²; the other columns are
    means over the counted nuclei of their drawn attributes. Descriptive, not diagnostic: no lesion label.
    """
    out = np.zeros(len(MORPHOMETRY), np.float32)
    out[6] = dark_share(nuc, factor)
    count = table["y"].size
    if count == 0 or nuc.owner.min() < 0:
        return out
    area = np.bincount(nuc.owner.ravel(), weights=nuc.cover.ravel(), minlength=count)[:count] * px_um**2
    seen = area > MIN_NUCLEUS_UM2
    if not seen.any():
        return out
    a = area[seen]
    field_um2 = (nuc.owner.shape[0] * px_um) ** 2
    out[:6] = (seen.sum() / field_um2 * 1e4, a.mean(), a.std() / a.mean(), table["ves"][seen].mean(),
               (table["nucleolus"][seen] > 0).mean(), (table["mitosis"][seen] > 0).mean())
    return out
