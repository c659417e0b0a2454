"""Synthetic H&E hospitals (the embedded benchmark): patients, patient-disjoint splits, cached rendering.

Everything produced here is SYNTHETIC. Each hospital is a set of patients (cohort.py) whose
patches the tissue renderer (tissue/) draws: the label lives in architecture and nuclear texture,
hospitals differ like labs and scanners. Splits are by patient, with the same code as BreakHis
(common.datasets.patients.split_patients); `partition` records site → split → patient ids. A patch
spans tissue.FIELD_UM micrometres (tissue.UM_PER_PX at 64 px), whatever model.image-size is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.datasets import cohort, tissue
from common.datasets.cohort import Hospital, Patient, hospital, parse_mix, site_patients
from common.datasets.index_cache import cached_arrays, default_cache_dir
from common.datasets.patients import SPLITS, split_patients
from common.datasets.splits import ArraySplit
from common.datasets.summary import SplitSummary
from common.datasets.tissue import FIELD_UM, SUBTYPES, UM_PER_PX, render_patch

if TYPE_CHECKING:
    from common.config import RunConfig

FIELDS_PER_PATIENT = 4  # regions of a patient's slide its patches come from (neighbouring fields look alike)

__all__ = [
    "FIELD_UM", "SPLITS", "SUBTYPES", "UM_PER_PX", "Hospital", "Patient", "SyntheticSplit", "check", "cohort_of",
    "generate", "hospital", "load_split", "partition", "render", "site_names", "source_files",
]


class SyntheticSplit(ArraySplit):
    """Rendered patches with, per patch, the patient id and subtype index (for audits, exports, leakage studies)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, patients: np.ndarray, subtypes: np.ndarray) -> None:
        super().__init__(images, labels, patients=patients)
        self.subtypes = np.asarray(subtypes, dtype=np.int64)


@dataclass(frozen=True)
class Cohort:
    """One site: its lab, its patients, and which patients are in which split."""

    hospital: Hospital
    patients: tuple[Patient, ...]
    splits: dict[str, list[str]]


def site_names(cfg: RunConfig) -> list[str]:
    """Names of the simulated hospitals."""
    return [f"synthetic-hospital-{i}" for i in range(cfg.federation.num_sites)]


def source_files() -> list[Path]:
    """The generator's source: this module, the cohort and every renderer file (the cache key hashes them)."""
    return [Path(__file__), Path(cohort.__file__), *tissue.source_files()]


@functools.lru_cache(maxsize=64)
def cohort_of(site: int, num_sites: int, seed: int, patients: int, mix: str, outlier_site: int,
              val_fraction: float, test_fraction: float) -> Cohort:
    """The site's lab, patients and patient-disjoint train/val/test split (deterministic from the seed)."""
    if patients < 1:
        raise ValueError(f"data.patients-per-site must be at least 1 (got {patients})")
    hosp = hospital(site, num_sites, seed, outlier=site == outlier_site)
    people = tuple(site_patients(site, hosp, patients, seed, parse_mix(mix)))
    records = [{"patient": p.id, "binary": int(p.malignant)} for p in people]
    splits = split_patients(records, seed=seed + site, val_fraction=val_fraction, test_fraction=test_fraction)
    return Cohort(hosp, people, splits)


def _cohort(cfg: RunConfig, site: int) -> Cohort:
    d = cfg.data
    return cohort_of(site, cfg.federation.num_sites, d.seed, d.patients_per_site, d.subtype_mix, d.outlier_site,
                     d.val_fraction, d.test_fraction)


def partition(cfg: RunConfig) -> dict[str, Any]:
    """Audit record like the real readers': site → split → patient ids, plus each site's lab and case mix."""
    sites = {}
    for i, name in enumerate(site_names(cfg)):
        c = _cohort(cfg, i)
        sites[name] = {
            **c.splits, "malignant-fraction": round(c.hospital.malignant_fraction, 3),
            "outlier-lab": c.hospital.outlier,
            "subtypes": {p.id: SUBTYPES[p.subtype].name for p in c.patients},
        }
    d = cfg.data
    return {"dataset": "synthetic", "seed": d.seed, "um-per-px-at-64": UM_PER_PX, "patients-per-site": d.patients_per_site,
            "subtype-mix": d.subtype_mix, "label-noise": d.label_noise, "sites": sites}


def check(cfg: RunConfig) -> list[SplitSummary]:
    """Per site and split: images per class and patients (generated, so nothing is unreadable)."""
    out = []
    for i, name in enumerate(site_names(cfg)):
        for split in SPLITS:
            data = load_split(cfg, i, split)
            counts = np.bincount(data.labels, minlength=cfg.model.num_classes)
            out.append(SplitSummary(name, split, {k: int(v) for k, v in enumerate(counts)},
                                    patients=len(set(data.patients.tolist()))))
    return out


def split_size(cfg: RunConfig, split: str) -> int:
    """Patches per site in a split: data.train-per-site for train, data.test-per-site for val and test."""
    return cfg.data.train_per_site if split == "train" else cfg.data.test_per_site


def load_split(cfg: RunConfig, site: int, split: str) -> SyntheticSplit:
    """One site's synthetic split, generated deterministically from the config's seed (no stain handling: load_site's)."""
    d = cfg.data
    return generate(
        site=site, num_sites=cfg.federation.num_sites, split=split, n=split_size(cfg, split),
        image_size=cfg.model.image_size, num_classes=cfg.model.num_classes, seed=d.seed,
        cache_dir=str(default_cache_dir(d.cache_dir)), patients=d.patients_per_site, mix=d.subtype_mix,
        outlier_site=d.outlier_site, label_noise=d.label_noise, val_fraction=d.val_fraction,
        test_fraction=d.test_fraction,
    )


@functools.lru_cache(maxsize=16)
def generate(
    *, site: int, num_sites: int, split: str, n: int, image_size: int, num_classes: int, seed: int,
    cache_dir: str = "", patients: int = 60, mix: str = "uniform", outlier_site: int = -1, label_noise: float = 0.0,
    val_fraction: float = 0.15, test_fraction: float = 0.2,
) -> SyntheticSplit:
    """Render n patches of a site's split; cached per process, and on disk under cache_dir when given."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    key = {"site": site, "num_sites": num_sites, "split": split, "n": n, "image_size": image_size,
           "num_classes": num_classes, "seed": seed, "patients": patients, "mix": mix, "outlier_site": outlier_site,
           "label_noise": label_noise, "val_fraction": val_fraction, "test_fraction": test_fraction}
    build = functools.partial(_render_split, **key)  # deployment: a fresh process per message, so use the disk
    arrays = (cached_arrays("synthetic", key, build, cache_dir=Path(cache_dir), code=source_files())
              if cache_dir else build())
    return SyntheticSplit(arrays["images"], arrays["labels"], arrays["patients"], arrays["subtypes"])


def allocate(patient_ids: list[str], n: int, rng: np.random.Generator) -> list[int]:
    """Patches per patient: n shared as evenly as possible (who gets one more is drawn)."""
    if not patient_ids:
        return []
    counts = np.full(len(patient_ids), n // len(patient_ids))
    counts[rng.permutation(len(patient_ids))[: n % len(patient_ids)]] += 1
    return counts.tolist()


def _render_split(
    *, site: int, num_sites: int, split: str, n: int, image_size: int, num_classes: int, seed: int, patients: int,
    mix: str, outlier_site: int, label_noise: float, val_fraction: float, test_fraction: float,
) -> dict[str, np.ndarray]:
    c = cohort_of(site, num_sites, seed, patients, mix, outlier_site, val_fraction, test_fraction)
    by_id = {p.id: p for p in c.patients}
    ids = c.splits[split]
    if not ids:
        raise ValueError(f"synthetic-hospital-{site} has no '{split}' patients: raise data.patients-per-site "
                         f"(now {patients}) or the split's fraction")
    counts = allocate(ids, n, np.random.default_rng([seed, site, 31, SPLITS.index(split)]))
    images, owners, subtypes = [], [], []
    for pid, count in zip(ids, counts):
        p, k = by_id[pid], int(pid.rsplit("p", 1)[1])
        for j in range(count):
            rng = np.random.default_rng([seed, site, k, j, image_size])
            field = np.random.default_rng([seed, site, k, 7331, j % FIELDS_PER_PATIENT, image_size])
            images.append(render_patch(rng, image_size, p.subtype, p.biology, p.stain, c.hospital.scanner, field))
            owners.append(pid)
            subtypes.append(p.subtype)
    sub = np.asarray(subtypes, np.int64)
    labels = sub if num_classes == 8 else (sub >= 4).astype(np.int64)
    if label_noise > 0 and split != "test":  # annotation errors in training data; the test labels stay true
        labels = _noisy(labels, label_noise, num_classes, np.random.default_rng([seed, site, 53, SPLITS.index(split)]))
    return {"images": np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8),
            "labels": labels.astype(np.int64), "patients": np.asarray(owners, dtype=str).reshape(-1),
            "subtypes": sub}


def _noisy(labels: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Each label replaced, with probability rate, by a uniformly drawn different class."""
    flip = rng.random(labels.size) < rate
    other = (labels + rng.integers(1, num_classes, labels.size)) % num_classes
    return np.where(flip, other, labels)


def render(rng: np.random.Generator, size: int, subtype: Any, hosp: Hospital) -> np.ndarray:
    """One patch of a subtype (index or SUBTYPES entry) from a fresh random patient of this hospital (fixture writers)."""
    index = subtype if isinstance(subtype, (int, np.integer)) else SUBTYPES.index(subtype)
    bio = tissue.sample_biology(rng, SUBTYPES[index].malignant)
    return render_patch(rng, size, int(index), bio, cohort.slide_stain(rng, hosp.stain), hosp.scanner)
