"""The renderer's fast kernels give bit for bit what the numpy calls they replace give."""

from __future__ import annotations

import numpy as np
import pytest

from common.datasets.tissue.canvas import box_mean
from common.datasets.tissue.nuclei import stable_order


@pytest.mark.parametrize(("factor", "side"), [(1, 64), (2, 128), (2, 192), (3, 129), (4, 128)])
def test_box_mean_equals_numpy_mean_over_the_block_axes(factor: int, side: int) -> None:
    image = np.random.default_rng(factor * side).random((side, side, 3)).astype(np.float32)
    n = side // factor
    expected = image[: n * factor, : n * factor].reshape(n, factor, n, factor, 3).mean(axis=(1, 3))
    got = box_mean(image, factor)
    assert got.dtype == np.float32 and np.array_equal(got, expected)


@pytest.mark.parametrize("seed", range(6))
def test_stable_order_equals_a_stable_argsort_with_ties_and_signed_zeros(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.normal(size=int(rng.integers(2, 4000))).astype(np.float32)
    values[rng.integers(0, values.size, values.size // 3)] = rng.choice(np.float32([0.0, -0.0, 1.5, -2.25]))
    if seed % 2:
        values = np.round(values, 1)  # many ties
    assert np.array_equal(stable_order(values), np.argsort(values, kind="stable"))
