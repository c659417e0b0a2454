"""Synthetic H&E-like multi-hospital patches: seeded, label learnable from nuclear morphology, stain shifted per site.

Everything produced here is SYNTHETIC. Images are rendered in optical-density space with the
Ruifrok & Johnston (2001) haematoxylin/eosin vectors: pink eosin stroma with fibre texture and
purple haematoxylin nuclei. The label lives in morphology (malignant: denser, larger, more
pleomorphic, darker nuclei; each of the 8 BreakHis-like subtypes has its own pattern), while
each hospital changes stain colour/intensity, brightness and class balance (non-IID sites).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.datasets.index_cache import cached_arrays, default_cache_dir
from common.datasets.splits import ArraySplit
from common.datasets.summary import SplitSummary

if TYPE_CHECKING:
    from common.config import RunConfig

H_OD = np.array([0.650, 0.704, 0.286])  # haematoxylin optical density (Ruifrok & Johnston 2001)
E_OD = np.array([0.072, 0.990, 0.105])  # eosin
SPLITS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class Morphology:
    """Nuclear pattern of one subtype (sizes in pixels at 64 px; scaled with the image)."""

    name: str
    malignant: bool
    density: float  # nuclei per 64x64 area
    radius: float  # mean nuclear radius
    pleomorphism: float  # relative sd of radius and boundary irregularity
    darkness: float  # haematoxylin concentration
    elongation: float  # max axis ratio
    clusters: int  # 0 = scattered; k = nuclei gathered around k centres
    mucin: float  # pale mucin pools (0 = none)


SUBTYPES: tuple[Morphology, ...] = (
    Morphology("adenosis", False, 14, 2.4, 0.10, 0.9, 1.3, 3, 0.0),
    Morphology("fibroadenoma", False, 9, 2.2, 0.10, 0.8, 2.0, 2, 0.0),
    Morphology("phyllodes_tumor", False, 18, 2.5, 0.15, 0.9, 2.4, 0, 0.0),
    Morphology("tubular_adenoma", False, 12, 2.6, 0.10, 1.0, 1.2, 5, 0.0),
    Morphology("ductal_carcinoma", True, 30, 3.6, 0.35, 1.5, 1.5, 0, 0.0),
    Morphology("lobular_carcinoma", True, 26, 3.0, 0.30, 1.4, 1.2, 6, 0.0),
    Morphology("mucinous_carcinoma", True, 22, 3.4, 0.35, 1.5, 1.4, 3, 0.6),
    Morphology("papillary_carcinoma", True, 28, 3.8, 0.40, 1.6, 2.0, 2, 0.0),
)


@dataclass(frozen=True)
class Hospital:
    """Scanner/stain profile and case mix of one simulated hospital."""

    h_vector: np.ndarray
    e_vector: np.ndarray
    h_scale: float
    e_scale: float
    brightness: float
    malignant_fraction: float


def site_names(cfg: RunConfig) -> list[str]:
    """Names of the simulated hospitals."""
    return [f"synthetic-hospital-{i}" for i in range(cfg.federation.num_sites)]


def partition(cfg: RunConfig) -> dict:
    """Audit record of the simulated hospitals (generated, so no patients to deal out)."""
    sites = {}
    for i, name in enumerate(site_names(cfg)):
        h = hospital(i, cfg.federation.num_sites, cfg.data.seed)
        sites[name] = {"malignant-fraction": round(h.malignant_fraction, 3), "h-scale": round(h.h_scale, 3),
                       "e-scale": round(h.e_scale, 3), "train": cfg.data.train_per_site, "test": cfg.data.test_per_site}
    return {"dataset": "synthetic", "seed": cfg.data.seed, "sites": sites}


def check(cfg: RunConfig) -> list[SplitSummary]:
    """Per site and split: images per class (synthetic: generated, nothing unreadable, no patients)."""
    out = []
    for i, name in enumerate(site_names(cfg)):
        for split in SPLITS:
            counts = np.bincount(load_split(cfg, i, split).labels, minlength=cfg.model.num_classes)
            out.append(SplitSummary(name, split, {k: int(v) for k, v in enumerate(counts)}, patients=0))
    return out


def hospital(site: int, num_sites: int, seed: int) -> Hospital:
    """Deterministic stain profile and class balance for one site."""
    rng = np.random.default_rng([seed, 7919, site])
    jitter = lambda v: _unit(v + rng.normal(0.0, 0.08, 3))  # noqa: E731
    spread = site / max(num_sites - 1, 1)  # 0 .. 1 across sites: label skew 0.3 .. 0.7
    return Hospital(
        h_vector=jitter(H_OD),
        e_vector=jitter(E_OD),
        h_scale=float(rng.uniform(0.75, 1.3)),
        e_scale=float(rng.uniform(0.7, 1.35)),
        brightness=float(rng.uniform(-0.08, 0.08)),
        malignant_fraction=0.3 + 0.4 * spread if num_sites > 1 else 0.5,
    )


def load_split(cfg: RunConfig, site: int, split: str) -> ArraySplit:
    """One site's synthetic split, generated deterministically from the config's seed."""
    n = cfg.data.train_per_site if split == "train" else cfg.data.test_per_site
    data = generate(
        site=site,
        num_sites=cfg.federation.num_sites,
        split=split,
        n=n,
        image_size=cfg.model.image_size,
        num_classes=cfg.model.num_classes,
        seed=cfg.data.seed,
        cache_dir=str(default_cache_dir(cfg.data.cache_dir)),
    )
    return data


@functools.lru_cache(maxsize=16)
def generate(
    *, site: int, num_sites: int, split: str, n: int, image_size: int, num_classes: int, seed: int,
    cache_dir: str = "",
) -> ArraySplit:
    """Render n patches for a site and split; cached per process, and on disk under cache_dir when given."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    key = {"site": site, "num_sites": num_sites, "split": split, "n": n, "image_size": image_size,
           "num_classes": num_classes, "seed": seed}
    build = functools.partial(_render_split, **key)  # deployment: a fresh process per message, so use the disk
    arrays = cached_arrays("synthetic", key, build, cache_dir=Path(cache_dir), code=Path(__file__)) if cache_dir else build()
    return ArraySplit(arrays["images"], arrays["labels"])


def _render_split(
    *, site: int, num_sites: int, split: str, n: int, image_size: int, num_classes: int, seed: int
) -> dict[str, np.ndarray]:
    hosp = hospital(site, num_sites, seed)
    rng = np.random.default_rng([seed, site, SPLITS[split], image_size])
    malignant = rng.random(n) < hosp.malignant_fraction
    subtype = np.where(malignant, rng.integers(4, 8, n), rng.integers(0, 4, n))
    images = np.stack([render(rng, image_size, SUBTYPES[s], hosp) for s in subtype])
    labels = subtype if num_classes == 8 else malignant.astype(np.int64)
    return {"images": images, "labels": labels.astype(np.int64)}


def render(rng: np.random.Generator, size: int, morph: Morphology, hosp: Hospital) -> np.ndarray:
    """Render one H x W x 3 uint8 patch."""
    scale = size / 64.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    conc_e = _stroma(rng, xx, yy, scale) * (1.0 - morph.mucin * _blobs(rng, xx, yy, scale))
    conc_h = 0.04 + 0.03 * rng.random((size, size), dtype=np.float32)
    for cy, cx in _centres(rng, size, morph):
        _stamp_nucleus(rng, conc_h, cy, cx, morph, scale)
    od = (hosp.h_scale * conc_h)[..., None] * hosp.h_vector
    od = od + (hosp.e_scale * conc_e)[..., None] * hosp.e_vector
    rgb = np.exp(-od) + hosp.brightness + rng.normal(0.0, 0.015, od.shape)
    return (np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.abs(v)
    return v / np.linalg.norm(v)


def _stroma(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, scale: float) -> np.ndarray:
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(0.25, 0.5) / scale
    fibres = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq + rng.uniform(0, 6.3))
    return (0.32 + 0.10 * fibres + 0.05 * rng.random(xx.shape)).astype(np.float32)


def _blobs(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, scale: float) -> np.ndarray:
    size = xx.shape[0]
    out = np.zeros_like(xx)
    for _ in range(2):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(8, 16) * scale
        out = np.maximum(out, np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
    return out


def _centres(rng: np.random.Generator, size: int, morph: Morphology) -> np.ndarray:
    count = rng.poisson(morph.density * (size / 64.0) ** 2)
    if morph.clusters == 0:
        return rng.uniform(0, size, (count, 2))
    hubs = rng.uniform(0.15 * size, 0.85 * size, (morph.clusters, 2))
    picks = hubs[rng.integers(0, morph.clusters, count)]
    return np.clip(picks + rng.normal(0.0, 0.09 * size, (count, 2)), 0, size - 1)


def _stamp_nucleus(
    rng: np.random.Generator, conc: np.ndarray, cy: float, cx: float, morph: Morphology, scale: float
) -> None:
    size = conc.shape[0]
    r = max(0.8, morph.radius * scale * (1.0 + morph.pleomorphism * rng.normal()))
    ratio = rng.uniform(1.0, morph.elongation)
    a, b = r * np.sqrt(ratio), r / np.sqrt(ratio)
    ext = int(np.ceil(a * 1.5)) + 1
    y0, y1 = max(0, int(cy) - ext), min(size, int(cy) + ext + 1)
    x0, x1 = max(0, int(cx) - ext), min(size, int(cx) + ext + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    dx, dy = xx - cx, yy - cy
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    wobble = 1.0 + morph.pleomorphism * 0.5 * np.sin(3 * np.arctan2(v, u) + rng.uniform(0, 6.3))
    inside = (u / a) ** 2 + (v / b) ** 2 <= wobble**2
    chromatin = morph.darkness * (0.8 + 0.4 * rng.random(inside.shape, dtype=np.float32))
    conc[y0:y1, x0:x1] = np.where(inside, np.maximum(conc[y0:y1, x0:x1], chromatin), conc[y0:y1, x0:x1])
