"""Nuclear morphometry (the public corpus's descriptive labels): it measures the nuclei that were painted."""

from __future__ import annotations

import numpy as np

from common.datasets.tissue import MORPHOMETRY
from common.datasets.tissue.canvas import Canvas
from common.datasets.tissue.nuclei import LUMINAL, morphometry, paint, sample


def _canvas(seeds: int, rng: np.random.Generator, **nuclei) -> tuple[Canvas, dict[str, np.ndarray]]:
    cv = Canvas(128, 112.0 / 128, rng)
    side = int(np.ceil(np.sqrt(seeds)))
    grid = (np.arange(seeds) % side, np.arange(seeds) // side)
    y, x = [(g + 0.5) * 128 / side for g in grid]
    attrs = sample(LUMINAL, rng, seeds)
    attrs.update(visible=np.ones(seeds, np.float32), irr=np.zeros(seeds, np.float32), mitosis=np.zeros(seeds, np.float32),
                 **nuclei)
    cv.add_seeds(y, x, attrs)
    return cv, cv.seed_table()


def test_morphometry_counts_and_sizes_the_painted_nuclei() -> None:
    rng = np.random.default_rng(0)
    a = np.full(16, 3.0, np.float32)  # round nuclei of radius 3 um, one per cell of a 4 x 4 grid
    cv, table = _canvas(16, rng, a=a, b=a.copy(), nucleolus=np.r_[np.ones(4), np.zeros(12)].astype(np.float32),
                        ves=np.full(16, 0.5, np.float32))
    m = dict(zip(MORPHOMETRY, morphometry(paint(cv, table, 1.0), table, cv.px_um, factor=2)))
    assert m["nuclei per 1e4 um²"] == np.float32(16 / 112.0**2 * 1e4)
    assert abs(m["mean nuclear area"] - np.pi * 9.0) / (np.pi * 9.0) < 0.1  # soft edges: within 10 %
    assert m["nuclear area cv"] < 0.05 and m["nucleolated share"] == 0.25 and m["mitotic share"] == 0.0
    assert abs(m["vesicular chromatin"] - 0.5) < 1e-6


def test_bigger_and_more_varied_nuclei_measure_bigger_and_more_varied() -> None:
    rng = np.random.default_rng(1)
    small = np.full(25, 2.5, np.float32)
    varied = np.linspace(2.0, 4.5, 25).astype(np.float32)
    (cv1, t1), (cv2, t2) = _canvas(25, rng, a=small, b=small.copy()), _canvas(25, rng, a=varied, b=varied.copy())
    m1 = morphometry(paint(cv1, t1, 1.0), t1, cv1.px_um, 2)
    m2 = morphometry(paint(cv2, t2, 1.0), t2, cv2.px_um, 2)
    assert m2[1] > m1[1] and m2[2] > m1[2] + 0.1


def test_no_nuclei_measure_zero() -> None:
    cv = Canvas(128, 112.0 / 128, np.random.default_rng(2))
    table = cv.seed_table()
    assert not morphometry(paint(cv, table, 1.0), table, cv.px_um, 2)[:6].any()
