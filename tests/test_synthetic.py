"""The embedded synthetic hospitals: deterministic, patient-disjoint, non-IID across sites, label not in colour or count."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import ConfigError, RunConfig
from common.datasets import synthetic, tissue
from common.datasets.cohort import outlier_lab, hospital
from common.datasets.registry import get_dataset
from common.datasets.synthetic import generate

SMALL = {"federation.num-sites": 3, "model.image-size": 32, "data.patients-per-site": 12,
         "data.train-per-site": 48, "data.test-per-site": 24}


def _cfg(tmp_path, **extra) -> RunConfig:
    return RunConfig().override({**SMALL, "data.cache-dir": str(tmp_path), **extra})


def _split(site: int, split: str = "train", n: int = 48, classes: int = 2, seed: int = 0, **kw):
    return generate.__wrapped__(site=site, num_sites=3, split=split, n=n, image_size=32, num_classes=classes,
                                seed=seed, patients=12, **kw)


def test_deterministic_per_seed() -> None:
    a, b, c = _split(0, n=12), _split(0, n=12), _split(0, n=12, seed=1)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert list(a.patients) == list(b.patients)
    assert not np.array_equal(a.images, c.images)


def test_shapes_dtypes_and_splits_differ() -> None:
    train, test = _split(0, "train"), _split(0, "test", n=24)
    assert train.images.shape == (48, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and set(np.unique(train.labels)) <= {0, 1}
    assert not set(train.patients) & set(test.patients)


def test_patients_never_cross_sites_or_splits(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    audit = synthetic.partition(cfg)
    owners: dict[str, str] = {}
    for site, record in audit["sites"].items():
        for split in ("train", "val", "test"):
            for patient in record[split]:
                assert patient not in owners, f"{patient} in {owners.get(patient)} and {site}/{split}"
                owners[patient] = f"{site}/{split}"
    for i, site in enumerate(synthetic.site_names(cfg)):
        for split in ("train", "test"):
            data = synthetic.load_split(cfg, i, split)
            assert set(data.patients) <= set(audit["sites"][site][split])
            assert len(data) == (48 if split == "train" else 24)


def test_all_eight_subtypes_render_distinct_tissue() -> None:
    hosp = hospital(0, 3, 0)
    tiles = [synthetic.render(np.random.default_rng([7, k]), 32, sub, hosp) for k, sub in enumerate(tissue.SUBTYPES)]
    assert [s.name for s in tissue.SUBTYPES[:4]] == ["adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma"]
    assert [s.malignant for s in tissue.SUBTYPES] == [False] * 4 + [True] * 4
    for tile in tiles:
        assert tile.shape == (32, 32, 3) and tile.dtype == np.uint8 and tile.std() > 10  # texture, not a flat fill
    assert len({t.tobytes() for t in tiles}) == 8
    cohort = synthetic.cohort_of(1, 3, 0, 24, "uniform", -1, 0.15, 0.2)
    assert {p.subtype for p in cohort.patients} == set(range(8))  # the uniform mix deals every subtype


def test_hospitals_differ_in_stain_and_class_balance(tmp_path) -> None:
    labs = [hospital(s, 3, 0) for s in range(3)]
    assert labs[0].malignant_fraction < labs[1].malignant_fraction < labs[2].malignant_fraction
    assert not np.allclose(labs[0].h_vector, labs[1].h_vector)
    means = [_split(s, n=24).images.reshape(-1, 3).mean(axis=0) for s in range(3)]
    assert min(np.abs(means[a] - means[b]).max() for a in range(3) for b in range(a + 1, 3)) > 2.0
    outlier = hospital(1, 3, 0, outlier=True)  # a scanner outside every regular lab's range: heavier JPEG
    assert outlier.outlier and 0 < outlier.scanner.jpeg < 75
    assert all(lab.scanner.jpeg == 0 or lab.scanner.jpeg >= 75 for lab in labs)
    # its stain moves with OUTLIER_SHIFT: none at 0, at 1 a paler eosin than any regular lab's
    none, extreme = (outlier_lab(np.random.default_rng(0), shift)[0] for shift in (0.0, 1.0))
    assert none.e_scale == none.h_scale == 1.0 and not none.glass.any()
    assert extreme.e_scale < 0.8 <= min(lab.stain.e_scale for lab in labs)
    assert 0 < 1.0 - outlier.stain.e_scale < 1.0 - extreme.e_scale + 0.05  # the configured shift lies in between


def test_darkness_and_nuclear_area_overlap_between_classes() -> None:
    data = _split(1, n=120, seed=3)
    luma = data.images.astype(float) @ np.array([0.299, 0.587, 0.114])
    dark = (luma < 120).mean(axis=(1, 2))
    benign, malignant = dark[data.labels == 0], dark[data.labels == 1]
    assert benign.size and malignant.size
    assert abs(benign.mean() - malignant.mean()) < 0.5 * dark.std()  # the old generator: malignant 5x darker


def test_label_noise_flips_training_labels_only() -> None:
    clean, noisy = _split(0, n=96), _split(0, n=96, label_noise=0.3)
    assert np.array_equal(clean.images, noisy.images)
    flipped = (clean.labels != noisy.labels).mean()
    assert 0.15 < flipped < 0.45
    test_clean, test_noisy = _split(0, "test", n=24), _split(0, "test", n=24, label_noise=0.3)
    assert np.array_equal(test_clean.labels, test_noisy.labels)


@pytest.mark.parametrize(("key", "value", "named"), [
    ("data.subtype-mix", "ductal_carcinoma=1,cystic=2", "data.subtype-mix"),
    ("data.subtype-mix", "adenosis=1", "data.subtype-mix"),
    ("data.label-noise", 0.5, "data.label-noise"),
    ("data.label-noise", -0.1, "data.label-noise"),
    ("data.patients-per-site", 0, "data.patients-per-site"),
    ("data.outlier-site", 3, "data.outlier-site"),
])
def test_bad_synthetic_settings_are_one_line_errors(key: str, value: object, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig().override({key: value})
    assert named in str(err.value) and "\n" not in str(err.value)


def test_subtype_mix_weights_patients() -> None:
    only = "ductal_carcinoma=1,fibroadenoma=1"
    data = _split(0, n=48, classes=8, mix=only)
    assert set(np.unique(data.subtypes)) <= {1, 4}


def test_registry_names_and_audit(tmp_path) -> None:
    entry = get_dataset("synthetic")
    assert entry.synthetic
    cfg = _cfg(tmp_path)
    assert entry.site_names(cfg) == [f"synthetic-hospital-{i}" for i in range(3)]
    audit = entry.partition(cfg)
    assert audit["um-per-px-at-64"] == tissue.UM_PER_PX and len(audit["sites"]) == 3


def test_disk_cache_renders_once_and_survives_a_new_process(tmp_path, monkeypatch) -> None:
    args = dict(site=1, num_sites=3, split="test", n=12, image_size=32, num_classes=2, seed=5, patients=12)
    fresh = generate.__wrapped__(**args)  # no cache_dir: rendered in memory only
    calls = []
    real = synthetic._render_split
    monkeypatch.setattr(synthetic, "_render_split", lambda **kw: calls.append(kw) or real(**kw))
    first = generate.__wrapped__(**args, cache_dir=str(tmp_path))  # __wrapped__: as a new process would
    second = generate.__wrapped__(**args, cache_dir=str(tmp_path))
    assert len(calls) == 1 and len(list(tmp_path.glob("synthetic-*.npz"))) == 1
    for got in (first, second):
        assert np.array_equal(got.images, fresh.images) and np.array_equal(got.labels, fresh.labels)
        assert list(got.patients) == list(fresh.patients)
    next(tmp_path.glob("synthetic-*.npz")).write_bytes(b"not a zip")  # damaged: rebuilt, not trusted
    third = generate.__wrapped__(**args, cache_dir=str(tmp_path))
    assert len(calls) == 2 and np.array_equal(third.images, fresh.images)
    generate.__wrapped__(**{**args, "seed": 6}, cache_dir=str(tmp_path))  # another key: another file
    assert len(calls) == 3 and len(list(tmp_path.glob("synthetic-*.npz"))) == 2


def test_cache_key_covers_every_generator_file(tmp_path, monkeypatch) -> None:
    files = synthetic.source_files()
    names = {f.name for f in files}
    assert {"synthetic.py", "cohort.py", "patch.py", "nuclei.py", "subtypes.py", "optics.py"} <= names
    copies = []
    for f in files:  # a private copy of the generator's sources, so one can be "edited"
        copy = tmp_path / "src" / f.parent.name / f.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(f.read_bytes())
        copies.append(copy)
    monkeypatch.setattr(synthetic, "source_files", lambda: copies)
    calls = []
    real = synthetic._render_split
    monkeypatch.setattr(synthetic, "_render_split", lambda **kw: calls.append(kw) or real(**kw))
    args = dict(site=0, num_sites=3, split="test", n=4, image_size=32, num_classes=2, seed=0, patients=12,
                cache_dir=str(tmp_path / "cache"))
    generate.__wrapped__(**args)
    generate.__wrapped__(**args)
    assert len(calls) == 1
    renderer = next(c for c in copies if c.name == "nuclei.py")
    renderer.write_text(renderer.read_text() + "\n# the generator changed\n")
    generate.__wrapped__(**args)
    assert len(calls) == 2
