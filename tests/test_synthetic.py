"""The embedded synthetic hospitals: deterministic, non-IID across sites, label carried by morphology."""

from __future__ import annotations

import numpy as np

from common.datasets.registry import get_dataset
from common.datasets.synthetic import generate, hospital


def _split(site: int, split: str = "train", n: int = 64, classes: int = 2, seed: int = 0):
    return generate(site=site, num_sites=3, split=split, n=n, image_size=32, num_classes=classes, seed=seed)


def test_deterministic_and_seeded() -> None:
    a = generate.__wrapped__(site=0, num_sites=3, split="train", n=16, image_size=32, num_classes=2, seed=0)
    b = generate.__wrapped__(site=0, num_sites=3, split="train", n=16, image_size=32, num_classes=2, seed=0)
    c = generate.__wrapped__(site=0, num_sites=3, split="train", n=16, image_size=32, num_classes=2, seed=1)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)


def test_shapes_dtypes_and_splits_differ() -> None:
    train, test = _split(0, "train"), _split(0, "test")
    assert train.images.shape == (64, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and set(np.unique(train.labels)) <= {0, 1}
    assert not np.array_equal(train.images, test.images)


def test_sites_are_non_iid_in_stain_and_class_balance() -> None:
    profiles = [hospital(s, 3, 0) for s in range(3)]
    assert profiles[0].malignant_fraction < profiles[1].malignant_fraction < profiles[2].malignant_fraction
    assert not np.allclose(profiles[0].h_vector, profiles[1].h_vector)
    rates = [_split(s, n=400).labels.mean() for s in (0, 2)]
    assert rates[0] < 0.4 < 0.6 < rates[1]


def test_malignant_patches_carry_more_haematoxylin() -> None:
    data = _split(1, n=200)
    darkness = 255 - data.images.mean(axis=(1, 2, 3))
    assert darkness[data.labels == 1].mean() > darkness[data.labels == 0].mean() + 3


def test_eight_subtypes_and_registry_names() -> None:
    data = _split(1, n=200, classes=8)
    assert set(np.unique(data.labels)) == set(range(8))
    from common.config import RunConfig

    entry = get_dataset("synthetic")
    assert entry.synthetic
    assert entry.site_names(RunConfig()) == [f"synthetic-hospital-{i}" for i in range(3)]


def test_disk_cache_renders_once_and_survives_a_new_process(tmp_path, monkeypatch) -> None:
    from common.datasets import synthetic

    args = dict(site=1, num_sites=3, split="test", n=12, image_size=32, num_classes=2, seed=5)
    fresh = generate.__wrapped__(**args)  # no cache_dir: rendered in memory only
    calls = []
    real = synthetic._render_split
    monkeypatch.setattr(synthetic, "_render_split", lambda **kw: calls.append(kw) or real(**kw))
    first = generate.__wrapped__(**args, cache_dir=str(tmp_path))  # __wrapped__: as a new process would
    second = generate.__wrapped__(**args, cache_dir=str(tmp_path))
    assert len(calls) == 1 and len(list(tmp_path.glob("synthetic-*.npz"))) == 1
    for got in (first, second):
        assert np.array_equal(got.images, fresh.images) and np.array_equal(got.labels, fresh.labels)
    next(tmp_path.glob("synthetic-*.npz")).write_bytes(b"not a zip")  # damaged: rebuilt, not trusted
    third = generate.__wrapped__(**args, cache_dir=str(tmp_path))
    assert len(calls) == 2 and np.array_equal(third.images, fresh.images)
    generate.__wrapped__(**{**args, "seed": 6}, cache_dir=str(tmp_path))  # another key: another file
    assert len(calls) == 3 and len(list(tmp_path.glob("synthetic-*.npz"))) == 2
