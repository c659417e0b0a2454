"""The leakage protocol of the calibration benchmark: scored patches never trained on, their patients half-seen."""

from __future__ import annotations

import numpy as np

from common.datasets.registry import get_dataset
from simulations import calibration
from simulations.bench_calibration import size_config


def test_leaky_training_holds_the_scored_patients_but_not_the_scored_patches() -> None:
    cfg, _ = size_config("tiny")
    trains, scored = calibration.leakage_splits(cfg)
    entry = get_dataset(cfg.data.dataset)
    assert list(scored) == entry.site_names(cfg)
    for site, (leaky, held) in enumerate(zip(trains, scored.values())):
        train = entry.load_split(cfg, site, "train")
        test = entry.load_split(cfg, site, "test")
        assert len(leaky) == len(train)  # the same number of training patches as the patient-level protocol
        assert len(held) + (len(leaky) - np.isin(leaky.patients, train.patients).sum()) == len(test)
        assert set(held.patients) == set(test.patients)  # every test patient is scored ...
        assert set(held.patients) <= set(leaky.patients)  # ... and had patches in the leaky training set
        assert not set(held.patients) & set(train.patients)  # never in the patient-level one
        trained = {image.tobytes() for image in leaky.images}
        assert not any(image.tobytes() in trained for image in held.images)  # no scored patch was trained on
