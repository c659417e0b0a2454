"""One synthetic H&E patch: a patient's biology and a lab's stain and scanner in, uint8 RGB out."""

from __future__ import annotations

import math

import numpy as np

import common.datasets.tissue.nuclei as nuclei
import common.datasets.tissue.optics as optics
import common.datasets.tissue.structures as structures
from common.datasets.tissue.canvas import Canvas
from common.datasets.tissue.subtypes import SUBTYPES, Biology, Knobs, finish

REFERENCE_SIZE = 64  # pixels of the reference patch
UM_PER_PX = 1.75  # micrometres per pixel at REFERENCE_SIZE (a 64 px patch spans 112 um: one or two glands)
FIELD_UM = REFERENCE_SIZE * UM_PER_PX  # the field of view is fixed; other image sizes sample it finer or coarser
MIN_CANVAS = 128  # canvas pixels at least (rendered above the target size, then box-averaged)


def canvas_size(size: int) -> tuple[int, int]:
    """(canvas side, downsampling factor) for an output of `size` pixels."""
    factor = max(1, math.ceil(MIN_CANVAS / size))
    return size * factor, factor


def sample_biology(rng: np.random.Generator, malignant: bool) -> Biology:
    """A patient's random effects (grade only matters for carcinomas)."""
    return Biology(
        grade=float(rng.triangular(1.0, 2.0, 3.0)) if malignant else 1.0,
        cellularity=float(rng.beta(3.0, 3.0)),
        nuclear_size=float(np.exp(rng.normal(0.0, 0.08))),
        nuclear_dark=float(np.exp(rng.normal(0.0, 0.10))),
        fixation=float(rng.uniform(0.35, 1.0)),
        stroma=float(rng.beta(2.0, 2.5)),
        white=float(rng.uniform(0.05, 0.3)),
        pale=float(rng.choice([rng.uniform(0.0, 0.08), rng.uniform(0.15, 0.6)])),
        traits=tuple(float(t) for t in rng.random(4)),
    )


def sample_knobs(rng: np.random.Generator, bio: Biology) -> Knobs:
    """One patch's composition around its patient's."""
    cellularity = float(np.clip(bio.cellularity + rng.normal(0, 0.12), 0.0, 1.0))
    return Knobs(
        cellularity=cellularity,
        white=float(np.clip(bio.white + rng.normal(0, 0.06), 0.0, 0.6)),
        pale=float(np.clip(bio.pale + rng.normal(0, 0.08), 0.0, 0.8)),
        nuclear=float(np.clip(0.07 + 0.15 * cellularity + rng.normal(0, 0.02), 0.04, 0.3)),
        angle=float(rng.uniform(0, np.pi)),
    )


def render_patch(rng: np.random.Generator, size: int, subtype: int, bio: Biology, stain: optics.Stain,
                 scanner: optics.Scanner, field: np.random.Generator | None = None) -> np.ndarray:
    """Render one size x size x 3 uint8 patch of SUBTYPES[subtype] (FIELD_UM across, whatever the size).

    `field` draws the architecture (patches sharing a field generator's seed show the same region of
    the slide, as neighbouring images of one patient do); `rng` draws everything else (cells added,
    nuclei in the section plane, stain and scanner noise). Without `field`, rng draws both.
    """
    return draw_patch(rng, size, subtype, bio, stain, scanner, field, measure=False)[0]


def draw_patch(rng: np.random.Generator, size: int, subtype: int, bio: Biology, stain: optics.Stain,
               scanner: optics.Scanner, field: np.random.Generator | None = None, *, measure: bool = True,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """render_patch's image, the compartment map it was drawn from (canvas pixels, canvas.py codes) and its
    nuclear morphometry (nuclei.MORPHOMETRY: what a nucleus segmentation of the patch would measure; None
    unless `measure`)."""
    n, factor = canvas_size(size)
    field = rng if field is None else field
    cv = Canvas(n, FIELD_UM / n, field)
    knobs = sample_knobs(field, bio)
    SUBTYPES[subtype].layout(cv, field, bio, knobs)
    cv.rng = rng
    finish(cv, rng, bio, knobs, SUBTYPES[subtype].stroma)
    crisp, darkness = 0.35 + 0.65 * bio.fixation, 0.8 * bio.nuclear_dark
    table = cv.seed_table()
    nuc = nuclei.level(nuclei.paint(cv, table, crisp), darkness)
    dark = nuclei.dark_blocks(nuc, factor)
    short = knobs.nuclear - float(dark[0].mean())
    if short > 0.015:  # too little chromatin for the target: inflammatory cells join the stroma
        structures.inflammation(cv, rng, 1.5 * short)
        table = cv.seed_table()
        nuc = nuclei.level(nuclei.paint(cv, table, crisp), darkness)
        dark = nuclei.dark_blocks(nuc, factor)
    nuc = nuclei.thin(nuc, knobs.nuclear, factor, rng, dark)  # dark chromatin share: the patch's target, whatever its class
    h, e = optics.concentrations(cv, nuc, rng, fibre_angle=knobs.angle, fibre_contrast=float(rng.uniform(0.25, 0.5)))
    image = optics.to_rgb(h, e, stain, scanner, factor=factor, um_per_px=FIELD_UM / size, rng=rng)
    return image, cv.comp, nuclei.morphometry(nuc, table, cv.px_um, factor) if measure else None
