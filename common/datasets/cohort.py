"""Synthetic cohorts: hospitals that differ like labs and scanners, patients with their own random effects, subtype mixes.

SYNTHETIC. A hospital is a stain protocol, a scanner and a case mix; each patient carries one
subtype, a biology (grade, cellularity, nuclear size and darkness, fixation, stroma) and a small
stain offset of their own slide. One site can be an outlier lab (Camelyon17-style shift).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.datasets.tissue import SUBTYPES, Biology, Scanner, Stain, lab_vectors, sample_biology, unit

NAMES = tuple(s.name for s in SUBTYPES)
# How far the outlier lab's stain moves towards a bluer, paler extreme (0 = its scanner only, 1 = the extreme).
# Calibrated on seed 0 (simulations/bench_calibration.py, README "The synthetic benchmark"): trained on the
# other two hospitals, the outlier's accuracy drops 6.5 pt at 0, 15.9 at 0.25, 21 at 0.4, 28.9 (chance) at 1.
OUTLIER_SHIFT = 0.2
# BreakHis patients per subtype (24 benign, 58 malignant; Spanhol et al. 2016), as relative weights.
SUBTYPE_MIXES: dict[str, tuple[float, ...]] = {
    "uniform": (1.0,) * 8,
    "breakhis": (4.0, 10.0, 3.0, 7.0, 38.0, 5.0, 9.0, 6.0),
}


@dataclass(frozen=True)
class Hospital:
    """One simulated lab: its stain protocol, scanner and share of malignant patients."""

    stain: Stain
    scanner: Scanner
    malignant_fraction: float
    size: float = 1.0  # patients relative to data.patients-per-site
    outlier: bool = False

    @property
    def h_vector(self) -> np.ndarray:
        """The lab's haematoxylin OD vector."""
        return self.stain.h_vector

    @property
    def e_vector(self) -> np.ndarray:
        """The lab's eosin OD vector."""
        return self.stain.e_vector


@dataclass(frozen=True)
class Patient:
    """One synthetic patient: id, subtype index, biology and the stain of their slides."""

    id: str
    subtype: int
    biology: Biology
    stain: Stain

    @property
    def malignant(self) -> bool:
        """Whether the subtype is a carcinoma."""
        return SUBTYPES[self.subtype].malignant


def parse_mix(value: str) -> tuple[float, ...]:
    """Subtype weights from a mix name ('uniform', 'breakhis') or 'name=weight,...' (unlisted subtypes weigh 0)."""
    value = value.strip()
    if value in SUBTYPE_MIXES:
        return SUBTYPE_MIXES[value]
    weights = dict.fromkeys(NAMES, 0.0)
    for item in value.split(","):
        name, sep, weight = item.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise ValueError(f"unknown subtype mix '{value}': use {' or '.join(SUBTYPE_MIXES)}, or name=weight pairs "
                             f"with names from {', '.join(NAMES)}")
        try:
            weights[name] = float(weight)
        except ValueError:
            raise ValueError(f"subtype mix '{value}': weight of {name} is not a number") from None
        if not weights[name] >= 0:
            raise ValueError(f"subtype mix '{value}': weight of {name} must be >= 0")
    if not any(weights[n] > 0 for n in NAMES[:4]) or not any(weights[n] > 0 for n in NAMES[4:]):
        raise ValueError(f"subtype mix '{value}' needs a positive weight for a benign and a malignant subtype")
    return tuple(weights[n] for n in NAMES)


def outlier_lab(rng: np.random.Generator, shift: float) -> tuple[Stain, Scanner]:
    """An outlier lab: stain moved `shift` of the way to a bluer, paler extreme; a scanner with heavy JPEG."""
    h, e = lab_vectors(rng, 0.35 - shift * (0.35 - float(rng.uniform(0.1, 0.2))), 0.03)
    h = unit(h + shift * np.array([0.0, 0.05, 0.09]))  # a bluer haematoxylin batch
    e = unit(e + shift * np.array([0.06, 0.0, 0.04]))
    h_scale = 1.0 + shift * (float(rng.uniform(1.2, 1.25)) - 1.0)  # darker haematoxylin
    e_scale = 1.0 - shift * (1.0 - float(rng.uniform(0.74, 0.78)))  # paler eosin
    stain = Stain(h, e, h_scale, e_scale, shift * np.array([0.04, 0.035, 0.025]))
    scanner = Scanner(blur_um=float(rng.uniform(0.8, 0.9)), sharpen=0.0, jpeg=int(rng.integers(65, 72)),
                      illumination=float(rng.uniform(0.08, 0.12)), noise=0.02,
                      gains=np.array([1.0, 0.98, 0.94]), gamma=0.95)
    return stain, scanner


def hospital(site: int, num_sites: int, seed: int, *, outlier: bool = False) -> Hospital:
    """Deterministic lab profile of one site; an outlier lab is `outlier_lab` at OUTLIER_SHIFT."""
    rng = np.random.default_rng([seed, 7919, site])
    spread = site / max(num_sites - 1, 1)  # malignant share 0.45 .. 0.55 across sites
    if outlier:
        stain, scanner = outlier_lab(rng, OUTLIER_SHIFT)
    else:
        h, e = lab_vectors(rng, float(rng.uniform(0.35, 0.9)), 0.03)
        glass = float(rng.uniform(0.01, 0.04)) + rng.normal(0.0, 0.006, 3)  # near-neutral, slightly tinted
        stain = Stain(h, e, float(rng.uniform(0.8, 1.25)), float(rng.uniform(0.8, 1.25)), np.clip(glass, 0.0, None))
        scanner = Scanner(
            blur_um=float(rng.uniform(0.4, 1.1)), sharpen=float(rng.choice([0.0, rng.uniform(0.2, 0.6)])),
            jpeg=int(rng.choice([0, int(rng.integers(75, 96))])), illumination=float(rng.uniform(0.0, 0.1)),
            noise=float(rng.uniform(0.005, 0.02)), gains=1.0 + rng.normal(0.0, 0.025, 3),
            gamma=float(rng.uniform(0.92, 1.08)),
        )
    size = float(rng.uniform(0.7, 1.3)) if num_sites > 1 else 1.0
    return Hospital(stain, scanner, 0.45 + 0.1 * spread if num_sites > 1 else 0.5, size, outlier)


def slide_stain(rng: np.random.Generator, lab: Stain) -> Stain:
    """A patient's slide: the lab's protocol with this slide's own batch, thickness and timing offsets."""
    return Stain(
        h_vector=unit(lab.h_vector + rng.normal(0.0, 0.025, 3)), e_vector=unit(lab.e_vector + rng.normal(0.0, 0.025, 3)),
        h_scale=lab.h_scale * float(np.exp(rng.normal(0.0, 0.11))),
        e_scale=lab.e_scale * float(np.exp(rng.normal(0.0, 0.11))), glass=lab.glass,
    )


def site_patients(site: int, hosp: Hospital, per_site: int, seed: int, mix: tuple[float, ...]) -> list[Patient]:
    """The site's round(size x per_site) patients, round(malignant_fraction x count) of them malignant, subtypes by the mix."""
    rng = np.random.default_rng([seed, 104723, site])
    count = max(1, int(round(hosp.size * per_site)))
    n_mal = int(np.clip(round(hosp.malignant_fraction * count), 1 if count > 1 else 0, count - 1 if count > 1 else count))
    subtypes = _deal(rng, mix[:4], count - n_mal) + [4 + s for s in _deal(rng, mix[4:], n_mal)]
    subtypes = [subtypes[i] for i in rng.permutation(count)]
    return [
        Patient(f"h{site}-p{k:03d}", s, sample_biology(rng, SUBTYPES[s].malignant), slide_stain(rng, hosp.stain))
        for k, s in enumerate(subtypes)
    ]


def _deal(rng: np.random.Generator, weights: tuple[float, ...], count: int) -> list[int]:
    """count subtype indices in proportion to weights (largest remainder, ties broken at random)."""
    w = np.asarray(weights, float)
    if count <= 0 or w.sum() <= 0:
        return []
    quota = w / w.sum() * count
    counts = np.floor(quota).astype(int)
    rest = quota - counts + rng.random(len(w)) * 1e-6
    counts[np.argsort(-rest)[: count - counts.sum()]] += 1
    return [i for i, c in enumerate(counts) for _ in range(c)]
