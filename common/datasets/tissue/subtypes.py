"""The 8 BreakHis subtypes as architectures: where glands, layers, sheets, cords, papillae and mucin go.

Benign: organised two-layer glands (adenosis, tubular adenoma), compressed slit-like ducts in
cellular or myxoid stroma (fibroadenoma), leaf-like clefts in hypercellular stroma (phyllodes),
sometimes crowded benign epithelium (usual ductal hyperplasia, still with a myoepithelial layer).
Malignant: no myoepithelium; nests, sheets, cribriform spaces, abortive tubules (ductal),
single-file cords of small bland cells (lobular), clusters floating in mucin (mucinous), fronds
with thin fibrovascular cores and stratified epithelium (papillary). Cellularity, white space and
pale (myxoid/mucin) area are drawn from class-independent knobs, so their distributions overlap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import common.datasets.tissue.nuclei as nu
import common.datasets.tissue.structures as st
from common.datasets.tissue.canvas import EPI, MUCIN, MYXOID, SECRETION, STROMA, WHITE, Canvas


@dataclass(frozen=True)
class Biology:
    """A patient's random effects on the tissue."""

    grade: float  # 1..3: nuclear grade of a carcinoma (benign lesions ignore it)
    cellularity: float  # 0..1: how much epithelium the lesion packs
    nuclear_size: float  # multiplier on nuclear size
    nuclear_dark: float  # multiplier on chromatin density
    fixation: float  # 0..1: fixation quality (crisp chromatin when high)
    stroma: float  # 0..1: stromal cellularity
    white: float  # typical share of white (lumens, fat, edges)
    pale: float  # typical share of pale bluish material (myxoid stroma or mucin)
    traits: tuple[float, ...] = (0.5, 0.5, 0.5, 0.5)  # per-patient architectural variants (see _trait)


@dataclass(frozen=True)
class Knobs:
    """One patch's draw around its patient's biology."""

    cellularity: float
    white: float
    pale: float
    nuclear: float  # share of the patch that is dark chromatin (follows cellularity)
    angle: float  # dominant orientation (fibres, cords, ducts)


Layout = Callable[[Canvas, np.random.Generator, Biology, Knobs], None]


def _trait(rng: np.random.Generator, bio: Biology, index: int, share: float) -> bool:
    """A variant the patient's lesion tends to show: in 85 % of the patches of the `share` of patients that have it, 10 % of the rest."""
    return bool(rng.random() < (0.85 if bio.traits[index] < share else 0.1))


def _style(base: nu.Style, bio: Biology) -> nu.Style:
    return base.scaled(bio.nuclear_size, bio.nuclear_dark)


def _layers(rng: np.random.Generator) -> tuple[float, float]:
    """Luminal and myoepithelial layer thickness (um) of a benign gland."""
    return float(rng.uniform(6.5, 9.0)), float(rng.uniform(2.8, 3.8))


def _glandular(cv: Canvas, rng: np.random.Generator, bio: Biology, k: Knobs, *, count: float, lumen: tuple[float, float],
               gap: float, squash: float = 1.0, wobble: float = 0.06, style: nu.Style = nu.LUMINAL,
               myo: bool = True) -> None:
    luminal, myo_t = _layers(rng)
    lumen_r = rng.uniform(*lumen, max(1, int(count)))
    outer = lumen_r + luminal + (myo_t if myo else 0)
    items = []
    for cy, cx, r in st.pack(cv, rng, outer, gap):
        lr = r - luminal - (myo_t if myo else 0)
        aspect = rng.uniform(squash, 1.0)
        items.append(st.Gland(cy, cx, lr, lr * aspect, k.angle + rng.normal(0, 0.5), luminal, myo_t if myo else 0.0,
                              _style(style, bio), wobble=wobble, cell=rng.uniform(7.0, 9.0),
                              secretion=rng.random() < 0.2))
    st.glands(cv, rng, items)


def adenosis(cv: Canvas, rng: np.random.Generator, bio: Biology, k: Knobs) -> None:
    """Many small two-layer acini per lobule; sclerosing adenosis squeezes them."""
    sclerosing = _trait(rng, bio, 0, 0.35)
    _glandular(cv, rng, bio, k, count=8 + 14 * k.cellularity, lumen=(1.0, 3.0) if sclerosing else (2.0, 7.0),
               gap=rng.uniform(2.0, 9.0), squash=0.35 if sclerosing else 0.7)


def fibroadenoma(cv: Canvas, rng: np.random.Generator, bio: Biology, k: Knobs) -> None:
    """Proliferating stroma (cellular or myxoid) compressing ducts into slit-like or round channels."""
    luminal, myo_t = _layers(rng)
    items = []
    intracanalicular = _trait(rng, bio, 0, 0.6)
    for _ in range(1 + int(rng.random() < k.cellularity) + int(rng.random() < k.cellularity * 0.7)):
        cy, cx = rng.uniform(0.1 * cv.n, 0.9 * cv.n, 2)
        if intracanalicular:
            ru, rv, bend = rng.uniform(25, 60), rng.uniform(0.9, 2.5 + 6 * k.white), rng.uniform(-0.7, 0.7)
        else:
            ru = rng.uniform(4, 10 + 12 * k.white)
            rv, bend = ru * rng.uniform(0.6, 1.0), 0.0
        items.append(st.Gland(cy, cx, ru, rv, k.angle + rng.normal(0, 0.4), luminal, myo_t, _style(nu.LUMINAL, bio),
                              bend=bend, wobble=0.05, cell=rng.uniform(7.0, 9.0)))
    if _trait(rng, bio, 1, 0.3):  # crowded benign epithelium (usual ductal hyperplasia) filling a duct
        items.append(_crowded_duct(cv, rng, bio, luminal, myo_t))
    st.glands(cv, rng, items)
    _fill_crowded(cv, rng, bio, items)


def _crowded_duct(cv: Canvas, rng: np.random.Generator, bio: Biology, luminal: float, myo_t: float) -> st.Gland:
    cy, cx = rng.uniform(0.2 * cv.n, 0.8 * cv.n, 2)
    r = rng.uniform(18, 34)
    return st.Gland(cy, cx, r, r * rng.uniform(0.7, 1.0), rng.uniform(0, np.pi), luminal, myo_t,
                    _style(nu.LUMINAL, bio), wobble=0.06, cell=8.0, secretion=True)


def _fill_crowded(cv: Canvas, rng: np.random.Generator, bio: Biology, items: list[st.Gland]) -> None:
    """Usual ductal hyperplasia: the duct's lumen full of streaming cells, slit-like peripheral spaces."""
    for g in items:
        if not g.secretion or g.ru < 18:
            continue
        inside = ((cv.yy - g.cy) ** 2 + (cv.xx - g.cx) ** 2) * cv.px_um**2 < (g.rv * 0.97) ** 2
        slits = cv.threshold(cv.textures.crop(cv.textures.medium, rng), 0.12, where=inside)
        st.fill_cells(cv, rng, inside & ~slits, _style(nu.CROWDED, bio), 8.5, angle=rng.uniform(0, np.pi))
        cv.comp[inside & slits] = WHITE


def phyllodes_tumor(cv: Canvas, rng: np.random.Generator, bio: Biology, k: Knobs) -> None:
    """Leaf-like clefts lined by two layers, pushed by hypercellular stroma."""
    luminal, myo_t = _layers(rng)
    items = []
    for _ in range(1 + int(rng.random() < 0.6) + int(rng.random() < 0.3)):
        cy, cx = rng.uniform(0.0, cv.n, 2)
        items.append(st.Gland(cy, cx, rng.uniform(40, 90), rng.uniform(1.5, 3 + 14 * k.white), k.angle + rng.normal(0, 0.6),
                              luminal, myo_t, _style(nu.LUMINAL, bio), bend=rng.uniform(-1.2, 1.2), wobble=0.1,
                              cell=rng.uniform(7.0, 9.0)))
    st.glands(cv, rng, items)


def tubular_adenoma(cv: Canvas, rng: np.random.Generator, bio: Biology, k: Knobs) -> None:
    """Tightly packed small round tubules with tiny lumens and scant stroma."""
    _glandular(cv, rng, bio, k, count=8 + 12 * k.cellularity, lumen=(1.0, 2.5 + 4 * k.white), gap=rng.uniform(1.5, 6.0),
               squash=0.75, wobble=0.04)


def ductal_carcinoma(cv: Canvas, rng: np.random.Generator, bio: Biology, k: Knobs) -> None:
    """Invasive ductal (NST): irregular nests and sheets, cribriform spaces, abortive tubules, no myoepithelium."""
    style = _style(nu.carcinoma(bio.grade), bio)
    field = cv.textures.crop(cv.textures.smooth, rng) + 0.2 * cv.textures.crop(cv.textures.medium, rng)
    nests = cv.threshold(field, 0.14 + 0.42 * k.cellularity)
    tubules = []
    if rng.random() < (3.2 - bio.grade) / 2.2:  # tubule formation: Nottingham criterion 1
        lumen_r = rng.uniform(2.0, 4.0 + 6 * k.white, int(2 + 5 * rng.random()))
        for cy, cx, r in st.pack(cv, rng, lumen_r + 8.0, 4.0):
            tubules.append(st.Gland(cy, cx, r - 8, (r - 8) * rng.uniform(0.5, 1.0), rng.uniform(0, np.pi),
                                    rng.uniform(6.5, 9.0), 0.0, style, wobble=0.18, cell=9.0))
    if nests.mean() > 0.25 and _trait(rng, bio, 1, 0.45):  # cribriform: punched-out spaces inside a nest
        holes = rng.uniform(2.5, 4.0 + 7 * k.white, int(3 + 6 * rng.random()))
        for cy, cx, r in st.pack(cv, rng, holes + 7.0, 3.0):
            iy, ix = int(np.clip(cy, 0, cv.n - 1)), int(np.clip(cx, 0, cv.n - 1))
            if nests[iy, ix]:
                tubules.append(st.Gland(cy, cx, r - 7, (r - 7) * rng.uniform(0.8, 1.0), 0.0, 7.0, 0.0, style,
                                        wobble=0.05, cell=8.5))
    footprint = st.glands(cv, rng, tubules, basement=False)
    if _trait(rng, bio, 2, 0.6):  # retraction artefact around the nests
        halo = cv.threshold(field, min(0.95, nests.mean() + rng.uniform(0.02, 0.07)))
        cv.comp[halo & ~nests & ~footprint] = WHITE
    st.fill_cells(cv, rng, nests & ~footprint, style, style.diameter * rng.uniform(1.0, 1.2))


def lobular_carcinoma(cv: Canvas, rng: np.random.Generator, bio: Biology, k: Knobs) -> None:
    """Invasive lobular: discohesive small bland cells in single file and targetoid rings; no glands."""
    style = _style(nu.LOBULAR, bio)
    curves = []
    for _ in range(int(3 + 8 * k.cellularity)):
        curves.append(st.wavy_line(cv, rng, k.angle + rng.normal(0, 0.25), amplitude_um=rng.uniform(2, 9),
                                   wavelength_um=rng.uniform(40, 120)))
    if _trait(rng, bio, 0, 0.35):  # targetoid: rings around a residual benign duct
        cy, cx = rng.uniform(0.25 * cv.n, 0.75 * cv.n, 2)
        r = rng.uniform(6, 12)
        luminal, myo_t = _layers(rng)
        st.glands(cv, rng, [st.Gland(cy, cx, r, r, 0.0, luminal, myo_t, _style(nu.LUMINAL, bio))])
        for ring in range(2 + int(2 * k.cellularity)):
            rr = cv.px(r + luminal + myo_t + 7 + 10 * ring)
            t = np.linspace(0, 2 * np.pi, 200)
            curves.append(np.stack([cy + rr * np.sin(t), cx + rr * np.cos(t)], 1))
    st.cords(cv, rng, curves, style, spacing_um=rng.uniform(9.0, 11.5), cell_um=rng.uniform(8.0, 10.0))
    singles = rng.uniform(0, cv.n, (int(20 * k.cellularity * rng.random()), 2))
    st.discs(cv, singles, 4.5, EPI)
    cv.add_seeds(singles[:, 0], singles[:, 1], nu.sample(style, rng, len(singles)))


def mucinous_carcinoma(cv: Canvas, rng: np.random.Generator, bio: Biology, k: Knobs) -> None:
    """Clusters of tumour cells floating in lakes of mucin, divided by thin fibrous septa."""
    style = _style(nu.carcinoma(min(bio.grade, 2.2)), bio).scaled(dark=0.88)
    lake = cv.threshold(cv.textures.crop(cv.textures.smooth, rng), float(np.clip(k.pale, 0.06, 0.7)))
    st.mucin(cv, lake)
    for _ in range(int(rng.integers(0, 3))):  # fibrous septa crossing the mucin
        line = st.wavy_line(cv, rng, rng.uniform(0, np.pi), amplitude_um=5, wavelength_um=90)
        dist, _ = cv.distance_to(cv.raster_curve(line))
        cv.comp[(dist < rng.uniform(1.5, 3.5)) & lake] = STROMA
    radii = rng.uniform(10.0, 18.0 + 14 * k.cellularity, int(11 + 14 * k.cellularity))
    medium = cv.textures.crop(cv.textures.medium, rng)
    tubules = []
    for cy, cx, r in st.pack(cv, rng, radii, 4.0, tries=60):
        iy, ix = int(np.clip(cy, 0, cv.n - 1)), int(np.clip(cx, 0, cv.n - 1))
        if not lake[iy, ix] and rng.random() < 0.6:  # the clusters float in the mucin
            continue
        blob = (np.hypot(cv.yy - cy, cv.xx - cx) * cv.px_um) < r * (1 + 0.25 * medium)
        st.fill_cells(cv, rng, blob, style, style.diameter * rng.uniform(1.0, 1.15))
        if r > 11 and rng.random() < 0.35:
            tubules.append(st.Gland(cy, cx, rng.uniform(1.5, 3.5), 2.5, 0.0, 7.0, 0.0, style, cell=8.5))
    st.glands(cv, rng, tubules, basement=False)


def papillary_carcinoma(cv: Canvas, rng: np.random.Generator, bio: Biology, k: Knobs) -> None:
    """Fronds with thin fibrovascular cores lined by stratified columnar epithelium, no myoepithelium."""
    cv.comp[:] = WHITE
    if _trait(rng, bio, 0, 0.5):  # cyst wall
        wall = cv.threshold((cv.xx * np.cos(k.angle) + cv.yy * np.sin(k.angle)) / cv.n
                            + 0.1 * cv.textures.crop(cv.textures.coarse, rng), rng.uniform(0.08, 0.3))
        cv.comp[wall] = STROMA
    style = _style(nu.PAPILLARY, bio).scaled(1.0 + 0.08 * (bio.grade - 1.0))
    epi, core = rng.uniform(6, 11), rng.uniform(8.0, 18.0)
    for _ in range(8):
        line = st.wavy_line(cv, rng, k.angle + rng.normal(0, 0.7), amplitude_um=rng.uniform(4, 14),
                            wavelength_um=rng.uniform(50, 140))
        st.fronds(cv, rng, [line], core_um=core, epi_um=epi, rows=1 + int(epi > 14), style=style, cell_um=7.5,
                  vessel=rng.random() < 0.35)
        if cv.share(WHITE) < k.white + 0.05:
            break


@dataclass(frozen=True)
class Subtype:
    """One BreakHis subtype: its name, class and architecture."""

    name: str
    malignant: bool
    layout: Layout
    stroma: float = 1.0  # stromal cellularity relative to ordinary stroma


SUBTYPES: tuple[Subtype, ...] = (
    Subtype("adenosis", False, adenosis),
    Subtype("fibroadenoma", False, fibroadenoma, stroma=2.0),
    Subtype("phyllodes_tumor", False, phyllodes_tumor, stroma=2.8),
    Subtype("tubular_adenoma", False, tubular_adenoma),
    Subtype("ductal_carcinoma", True, ductal_carcinoma, stroma=1.4),  # desmoplastic stroma
    Subtype("lobular_carcinoma", True, lobular_carcinoma),
    Subtype("mucinous_carcinoma", True, mucinous_carcinoma),
    Subtype("papillary_carcinoma", True, papillary_carcinoma),
)


def finish(cv: Canvas, rng: np.random.Generator, bio: Biology, k: Knobs, stromal: float = 1.0) -> None:
    """Shared by every subtype: the patch's white, pale and nuclear shares brought to its (class-independent) targets.

    White space is topped up with fat or a tissue edge; pale material with myxoid stroma; nuclei are
    thinned (nuclei outside the section plane) or inflammatory cells join the stroma.
    """
    deficit = k.white - cv.share(WHITE)
    stroma = cv.comp == STROMA
    if deficit > 0.02 and stroma.any():
        if _trait(rng, bio, 3, 0.7):  # fat, else the edge of the section
            zone = cv.threshold(cv.textures.crop(cv.textures.coarse, rng), min(1.0, 1.1 * deficit / stroma.mean()), where=stroma)
            st.fat(cv, rng, zone, rng.uniform(35, 75))
        else:
            st.edge(cv, rng, deficit + cv.share(WHITE))
    excess = cv.share(WHITE) - (k.white + 0.04)
    if excess > 0:  # too much empty space: part of the lumens and cysts hold secretion or proteinaceous fluid
        white = cv.comp == WHITE
        cv.comp[cv.threshold(cv.textures.crop(cv.textures.smooth, rng), excess / white.mean(), where=white)] = SECRETION
    pale = k.pale - cv.share(MUCIN, MYXOID, SECRETION)
    stroma = cv.comp == STROMA
    if pale > 0.02 and stroma.any():
        st.myxoid(cv, cv.threshold(cv.textures.crop(cv.textures.smooth, rng), min(1.0, pale / stroma.mean()), where=stroma))
    if rng.random() < 0.35:  # a capillary with red cells, in any stroma
        st.capillary(cv, rng)
    st.stroma_cells(cv, rng, density=min(0.9, stromal * (0.05 + 0.3 * bio.stroma)), angle=k.angle, lymphocytes=0.02,
                    spacing_um=rng.uniform(10.0, 13.0))
    if rng.random() < 0.4:  # chronic inflammation, in benign and malignant lesions alike
        st.inflammation(cv, rng, float(rng.uniform(0.005, 0.03)))
    have = DARK_PER_AREA * cv.nuclear_share()
    if have < 1.05 * k.nuclear:  # too few nuclei for the target: inflammatory cells join (render_patch thins the rest)
        st.inflammation(cv, rng, (1.05 * k.nuclear - have) / DARK_PER_AREA)


DARK_PER_AREA = 0.7  # dark-chromatin pixels per unit of estimated nuclear area (measured over the subtypes: 0.64-0.80)
