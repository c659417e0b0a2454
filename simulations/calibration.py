"""What the synthetic benchmark must withstand: trivial colour/count baselines, untrained and trained models, leakage, hospital shift.

SYNTHETIC data only. Each function takes a RunConfig of the synthetic dataset and returns plain
numbers; bench_calibration.py runs them at a size and prints the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from common.config import RunConfig
from common.datasets.registry import get_dataset
from common.datasets.tissue import E_OD, H_OD

DARK_LUMA = (80, 100, 120, 140)  # dark-pixel thresholds a reviewer would try (the one best on TRAINING data is used)
NUCLEAR_OD = (0.25, 0.35, 0.5)  # haematoxylin OD thresholds of the nuclear-area fraction, likewise


def _luma(images: np.ndarray) -> np.ndarray:
    return images[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def haematoxylin(images: np.ndarray) -> np.ndarray:
    """Colour deconvolution with the Ruifrok–Johnston vectors (N x H x W haematoxylin OD)."""
    od = -np.log10(np.clip(images.astype(np.float32), 1.0, 255.0) / 255.0)
    residual = np.cross(H_OD, E_OD)
    basis = np.stack([H_OD, E_OD, residual / np.linalg.norm(residual)])
    return (od @ np.linalg.inv(basis).astype(np.float32))[..., 0]


FEATURES = {
    "mean RGB": lambda x: x.reshape(len(x), -1, 3).mean(axis=1),
    "16-bin RGB histogram": lambda x: np.concatenate(
        [np.stack([np.bincount(c.ravel() // 16, minlength=16) for c in x[..., k]]) for k in range(3)], axis=1
    ) / (x.shape[1] * x.shape[2]),
    "dark-pixel share": lambda x: np.stack([(_luma(x) < t).mean(axis=(1, 2)) for t in DARK_LUMA], 1),
    "nuclear-area fraction": lambda x: np.stack([(haematoxylin(x) > t).mean(axis=(1, 2)) for t in NUCLEAR_OD], 1),
}
SCALAR = {"dark-pixel share", "nuclear-area fraction"}  # one feature each: columns are alternative thresholds


def _fit(x: np.ndarray, y: np.ndarray) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0)).fit(x, y)


def _accuracy(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
    """Test accuracy of logistic regression on one feature family.

    A scalar family (one column per candidate threshold) uses the column whose model fits the
    training data best, as a reviewer tuning the threshold on training data would.
    """
    (train_x, train_y), (test_x, test_y) = train, test
    if len(np.unique(train_y)) < 2:
        return float("nan")
    columns = [[k] for k in range(train_x.shape[1])] if name in SCALAR else [list(range(train_x.shape[1]))]
    models = [(_fit(train_x[:, c], train_y), c) for c in columns]
    model, cols = max(models, key=lambda m: (m[0].predict(train_x[:, m[1]]) == train_y).mean())
    return float((model.predict(test_x[:, cols]) == test_y).mean())


def _site_features(cfg: RunConfig, site: int, split: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    data = get_dataset("synthetic").load_split(cfg, site, split)
    return {name: f(data.images) for name, f in FEATURES.items()}, data.labels, data.subtypes


def trivial_baselines(cfg: RunConfig) -> dict[str, dict[str, float]]:
    """Per feature family: pooled test accuracy (binary, 8-class) and binary accuracy on unseen hospitals.

    Unseen: leave one hospital out in turn (train on the others' training splits, test on its test
    split), accuracy pooled over every hospital's turn.
    """
    sites = list(range(cfg.federation.num_sites))
    train = {s: _site_features(cfg, s, "train") for s in sites}
    test = {s: _site_features(cfg, s, "test") for s in sites}

    def stack(parts: Sequence[tuple], name: str, binary: bool) -> tuple[np.ndarray, np.ndarray]:
        y = np.concatenate([p[2] for p in parts])
        return np.concatenate([p[0][name] for p in parts]), ((y >= 4).astype(int) if binary else y)

    out = {}
    for name in FEATURES:
        hits = total = 0
        for held in sites if len(sites) > 1 else []:
            held_test = stack([test[held]], name, True)
            acc = _accuracy(name, stack([train[s] for s in sites if s != held], name, True), held_test)
            hits, total = hits + acc * len(held_test[1]), total + len(held_test[1])
        out[name] = {
            "pooled": _accuracy(name, stack(list(train.values()), name, True), stack(list(test.values()), name, True)),
            "unseen-hospital": hits / total if total else float("nan"),
            "pooled-8-class": _accuracy(name, stack(list(train.values()), name, False), stack(list(test.values()), name, False)),
        }
    return out


def composition(cfg: RunConfig, split: str = "train") -> dict[str, Any]:
    """Mean dark-pixel share and nuclear-area fraction per subtype (to see the classes overlap)."""
    rows: dict[str, list[float]] = {}
    from common.datasets.tissue import SUBTYPES

    for s in range(cfg.federation.num_sites):
        feats, _, subtypes = _site_features(cfg, s, split)
        for k, sub in enumerate(SUBTYPES):
            pick = subtypes == k
            if pick.any():
                rows.setdefault(sub.name, []).append(
                    (float(feats["dark-pixel share"][pick, 2].mean()), float(feats["nuclear-area fraction"][pick, 1].mean()),
                     float(feats["mean RGB"][pick].mean())))
    return {name: np.mean(v, axis=0).round(3).tolist() for name, v in rows.items()}


# ---- models: untrained, trained, leakage, hospital shift --------------------------------------


def untrained(cfg: RunConfig) -> dict[str, float]:
    """Pooled test AUC and accuracy of the model as initialised (the ServerApp's round-0 weights)."""
    import torch

    from common.nonfederated import evaluate_on_sites
    from common.model import build_model
    from common.training import prepare, select_device

    torch.manual_seed(cfg.train.seed)
    model = prepare(build_model(cfg.model), select_device(cfg.train.device), channels_last=cfg.train.channels_last)
    return _summary(evaluate_on_sites(model, cfg, range(cfg.federation.num_sites)))


def _sites(cfg: RunConfig, sites: Sequence[int] | None) -> list[int]:
    return list(range(cfg.federation.num_sites)) if sites is None else list(sites)


def fit(cfg: RunConfig, sites: Sequence[int] | None = None):
    """A model trained centrally on these sites' training splits (all by default) for the federation's budget."""
    from common.nonfederated import train_on_sites

    return train_on_sites(cfg, _sites(cfg, sites))


def trained(cfg: RunConfig, sites: Sequence[int] | None = None, model=None) -> dict[str, float]:
    """Pooled test metrics on these sites (all by default) of `model`, or of one trained on their training splits."""
    from common.nonfederated import evaluate_on_sites

    sites = _sites(cfg, sites)
    return _summary(evaluate_on_sites(fit(cfg, sites) if model is None else model, cfg, sites))


def leakage_splits(cfg: RunConfig) -> tuple[list[Any], dict[str, Any]]:
    """Per site: the leaky training set, and the patches both protocols are scored on.

    Half of every test patient's patches (drawn at random) replace as many random training patches; the
    other half is scored. The patient-level and the patch-level protocol then differ only in whether the
    scored patients had patches in training (Bussola et al. 2021), with the same number of training patches.
    """
    from common.datasets.splits import ArraySplit
    from common.datasets.stain import stain_transform

    entry = get_dataset(cfg.data.dataset)
    names = entry.site_names(cfg)
    trains, scored = [], {}
    for site in range(cfg.federation.num_sites):
        train, test = (entry.load_split(cfg, site, split) for split in ("train", "test"))
        rng = np.random.default_rng([cfg.data.seed, site, 977])
        seen = np.zeros(len(test), bool)
        for pid in np.unique(test.patients):
            own = np.flatnonzero(test.patients == pid)
            seen[rng.permutation(own)[: len(own) // 2]] = True
        keep = np.sort(rng.permutation(len(train))[: len(train) - int(seen.sum())])
        trains.append(ArraySplit(np.concatenate([train.images[keep], test.images[seen]]),
                                 np.concatenate([train.labels[keep], test.labels[seen]]),
                                 stain_transform(cfg.data, train=True),
                                 patients=np.concatenate([train.patients[keep], test.patients[seen]])))
        scored[names[site]] = ArraySplit(test.images[~seen], test.labels[~seen], stain_transform(cfg.data, train=False),
                                         patients=test.patients[~seen])
    return trains, scored


def leakage(cfg: RunConfig, patient_model) -> dict[str, float]:
    """Accuracy of the patient-level model (trained on the training patients only) and of a model trained with
    half of the test patients' patches, both on the other half; the leak in points."""
    from torch.utils.data import ConcatDataset

    from common.nonfederated import evaluate_splits, train_on_data
    from common.seeds import pooled_seed

    trains, scored = leakage_splits(cfg)
    leaky = train_on_data(cfg, ConcatDataset(trains), seed=pooled_seed(cfg.train.seed, range(cfg.federation.num_sites)))
    patient, patch = (_summary(evaluate_splits(m, cfg, scored))["accuracy"] for m in (patient_model, leaky))
    return {"patient-level": patient, "patch-level": patch, "leakage-pt": round(100 * (patch - patient), 1)}


def hospital_shift(cfg: RunConfig, outlier: int) -> dict[str, float]:
    """Site `outlier` made an outlier lab; train on the others; their pooled test vs the outlier's test."""
    from common.nonfederated import evaluate_on_sites, train_on_sites

    shifted = cfg.override({"data.outlier-site": outlier})
    others = [s for s in range(cfg.federation.num_sites) if s != outlier]
    model = train_on_sites(shifted, others)
    inside = _summary(evaluate_on_sites(model, shifted, others))
    outside = _summary(evaluate_on_sites(model, shifted, [outlier]))
    return {"in-distribution": inside["accuracy"], "outlier-hospital": outside["accuracy"],
            "drop-pt": round(100 * (inside["accuracy"] - outside["accuracy"]), 1)}


def _summary(report: dict[str, Any]) -> dict[str, float]:
    glob = report["global"]
    return {"accuracy": round(float(glob["accuracy"]), 4), "auc": round(float(glob["auc"]), 4)}
