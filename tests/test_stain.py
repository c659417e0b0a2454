"""Stain handling: Macenko (torchstain) pulls hospitals' colours together; HED jitter varies them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import DataConfig
from common.datasets.synthetic import generate
from common.datasets.stain import HedJitter, MacenkoTransform, stain_transform


def _patch(site: int) -> np.ndarray:
    data = generate(site=site, num_sites=3, split="train", n=8, image_size=64, num_classes=2, seed=0)
    return data.images[int(np.argmax(data.labels))]  # a malignant patch: plenty of haematoxylin


def test_macenko_brings_two_hospitals_closer() -> None:
    a, b = (generate(site=s, num_sites=3, split="train", n=8, image_size=64, num_classes=2, seed=0).images
            for s in (0, 1))
    norm = MacenkoTransform()
    na, nb = np.stack([norm(x) for x in a]), np.stack([norm(x) for x in b])
    assert na.shape == a.shape and na.dtype == np.uint8
    before = np.abs(a.reshape(-1, 3).mean(0) - b.reshape(-1, 3).mean(0)).sum()  # the labs' mean colours
    after = np.abs(na.reshape(-1, 3).mean(0) - nb.reshape(-1, 3).mean(0)).sum()
    assert after < before


def test_macenko_leaves_a_blank_patch_alone() -> None:
    blank = np.full((32, 32, 3), 250, dtype=np.uint8)
    np.testing.assert_array_equal(MacenkoTransform()(blank), blank)


def test_hed_jitter_is_random_but_seeded_and_bounded() -> None:
    img = _patch(1)
    torch.manual_seed(0)
    first = HedJitter(0.05)(img)
    torch.manual_seed(0)
    again = HedJitter(0.05)(img)
    second = HedJitter(0.05)(img)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, second) and not np.array_equal(first, img)
    assert np.abs(first.astype(int) - img.astype(int)).mean() < 30


def test_pipeline_by_config() -> None:
    assert stain_transform(DataConfig(), train=True) is None
    assert stain_transform(DataConfig(stain_augment=0.05), train=False) is None  # augmentation: training only
    assert stain_transform(DataConfig(stain_augment=0.05), train=True) is not None
    with pytest.raises(FileNotFoundError, match="stain-reference"):
        stain_transform(DataConfig(stain_normalize="macenko", stain_reference="/no/such.png"), train=False)
