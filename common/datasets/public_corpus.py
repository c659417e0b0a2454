"""The embedded PUBLIC pretraining corpus: synthetic H&E tissue-type patches from labs and patients that no site holds.

SYNTHETIC. Pretraining (common/pretrain.py) needs data that is public and not the hospitals' task: this
corpus is labelled with tissue types (stroma, epithelium, fat, lumen, mucin, lymphocytes), never with the
malignancy label; its epithelium spans the whole range of nuclear size, density, pleomorphism and darkness
with no class attached. Its labs (stain and scanner profiles) and patients are drawn from their own seed
space (`PUBLIC_SPACE`), so no lab or patient coincides with a simulated hospital's; patient ids are
`public-p…`, lab ids `public-lab-…`. `load_public_corpus` is the only entry point: switching the renderer
underneath (e.g. to richer tissue primitives) changes nothing for its callers. Rendered corpora are cached
on disk like the synthetic sites (`data.cache-dir`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.datasets import synthetic as syn
from common.datasets.index_cache import cached_arrays, default_cache_dir

if TYPE_CHECKING:
    from common.config import RunConfig

PUBLIC_SPACE = 0x5EED_0F_9B  # first seed word of every public draw: site draws start with data.seed instead
PATIENTS_PER_LAB = 12
PATCHES_PER_PATIENT = 20


@dataclass(frozen=True)
class PublicCorpus:
    """Images N x H x W x 3 uint8, tissue labels N, label names, and the patient and lab of each patch."""

    images: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]
    patients: np.ndarray  # str ids 'public-p00012'
    labs: np.ndarray  # str ids 'public-lab-003'

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _lab(seed: int, lab: int) -> syn.Hospital:
    """A public lab's stain/scanner profile (its own seed space; wider than the simulated hospitals')."""
    rng = np.random.default_rng([PUBLIC_SPACE, seed, lab])
    jitter = lambda v: syn._unit(v + rng.normal(0.0, 0.10, 3))  # noqa: E731
    return syn.Hospital(jitter(syn.H_OD), jitter(syn.E_OD), float(rng.uniform(0.65, 1.4)), float(rng.uniform(0.6, 1.45)),
                        float(rng.uniform(-0.1, 0.1)), 0.5)


def _epithelium_morphology(rng: np.random.Generator, *, dense: bool = False) -> syn.Morphology:
    """Nuclei of some epithelium: size, density, pleomorphism and darkness drawn over the whole range (no class)."""
    return syn.Morphology("epithelium", False, float(rng.uniform(10, 34)) * (1.3 if dense else 1.0),
                          float(rng.uniform(2.0, 4.0)), float(rng.uniform(0.05, 0.42)), float(rng.uniform(0.8, 1.65)),
                          float(rng.uniform(1.1, 2.2)), int(rng.integers(0, 7)), 0.0)


def _nuclei(rng: np.random.Generator, conc_h: np.ndarray, morph: syn.Morphology, scale: float,
            mask: np.ndarray | None = None) -> None:
    size = conc_h.shape[0]
    for cy, cx in syn._centres(rng, size, morph):
        if mask is None or mask[int(cy), int(cx)]:
            syn._stamp_nucleus(rng, conc_h, cy, cx, morph, scale)


def _stroma(rng, xx, yy, scale):  # noqa: ANN001, ANN202 - tissue renderers share one signature
    conc_e = syn._stroma(rng, xx, yy, scale)
    conc_h = 0.04 + 0.03 * rng.random(xx.shape, dtype=np.float32)
    fibroblast = syn.Morphology("fibroblast", False, float(rng.uniform(3, 9)), 1.4, 0.1, 0.8, 3.5, 0, 0.0)
    _nuclei(rng, conc_h, fibroblast, scale)
    return conc_h, conc_e


def _epithelium(rng, xx, yy, scale):  # noqa: ANN001, ANN202
    conc_e = syn._stroma(rng, xx, yy, scale) * float(rng.uniform(0.6, 1.0))
    conc_h = 0.04 + 0.03 * rng.random(xx.shape, dtype=np.float32)
    _nuclei(rng, conc_h, _epithelium_morphology(rng), scale)
    return conc_h, conc_e


def _fat(rng, xx, yy, scale):  # noqa: ANN001, ANN202
    size = xx.shape[0]
    seeds = rng.uniform(-0.2 * size, 1.2 * size, (int(rng.integers(5, 12)), 2))
    d = np.sqrt((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2)
    d.sort(axis=-1)
    wall = np.exp(-((d[..., 1] - d[..., 0]) ** 2) / (2 * (0.8 * scale) ** 2))  # thin membranes between adipocytes
    conc_e = (0.02 + 0.35 * wall).astype(np.float32)
    conc_h = 0.02 + 0.01 * rng.random(xx.shape, dtype=np.float32)
    flat = syn.Morphology("adipocyte", False, float(rng.uniform(1, 4)), 1.2, 0.1, 0.9, 3.0, 0, 0.0)
    _nuclei(rng, conc_h, flat, scale, mask=wall > 0.5)
    return conc_h, conc_e


def _lumen(rng, xx, yy, scale):  # noqa: ANN001, ANN202
    size = xx.shape[0]
    cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
    ry, rx = rng.uniform(0.18 * size, 0.38 * size, 2)
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    inside = r < 1.0
    rim = (r >= 1.0) & (r < 1.35)
    conc_e = np.where(inside, 0.02, syn._stroma(rng, xx, yy, scale)).astype(np.float32)
    conc_h = np.where(inside, 0.01, 0.04 + 0.03 * rng.random(xx.shape)).astype(np.float32)
    _nuclei(rng, conc_h, _epithelium_morphology(rng, dense=True), scale, mask=rim)
    return conc_h, conc_e


def _mucin(rng, xx, yy, scale):  # noqa: ANN001, ANN202
    pools = np.maximum(syn._blobs(rng, xx, yy, scale * 1.6), 0.55)
    conc_e = (syn._stroma(rng, xx, yy, scale) * (1.0 - 0.85 * pools)).astype(np.float32)
    conc_h = (0.04 + 0.12 * pools * (0.7 + 0.3 * rng.random(xx.shape))).astype(np.float32)  # pale blue-grey mucus
    floating = _epithelium_morphology(rng)
    floating = syn.Morphology("floating", False, floating.density * 0.4, floating.radius, floating.pleomorphism,
                              floating.darkness, floating.elongation, int(rng.integers(1, 4)), 0.0)
    _nuclei(rng, conc_h, floating, scale)
    return conc_h, conc_e


def _lymphocytes(rng, xx, yy, scale):  # noqa: ANN001, ANN202
    conc_e = syn._stroma(rng, xx, yy, scale) * float(rng.uniform(0.5, 0.9))
    conc_h = 0.04 + 0.03 * rng.random(xx.shape, dtype=np.float32)
    lymph = syn.Morphology("lymphocyte", False, float(rng.uniform(40, 75)), float(rng.uniform(1.4, 1.9)), 0.06, 1.7,
                           1.1, int(rng.integers(0, 3)), 0.0)
    _nuclei(rng, conc_h, lymph, scale)
    return conc_h, conc_e


Renderer = Callable[[np.random.Generator, np.ndarray, np.ndarray, float], tuple[np.ndarray, np.ndarray]]
TISSUES: dict[str, Renderer] = {  # tissue type → renderer of (haematoxylin, eosin) concentrations
    "stroma": _stroma,
    "epithelium": _epithelium,
    "fat": _fat,
    "lumen": _lumen,
    "mucin": _mucin,
    "lymphocytes": _lymphocytes,
}
TISSUE_TYPES: tuple[str, ...] = tuple(TISSUES)


def _render(rng: np.random.Generator, size: int, tissue: str, lab: syn.Hospital) -> np.ndarray:
    scale = size / 64.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    conc_h, conc_e = TISSUES[tissue](rng, xx, yy, scale)
    od = (lab.h_scale * conc_h)[..., None] * lab.h_vector + (lab.e_scale * conc_e)[..., None] * lab.e_vector
    rgb = np.exp(-od) + lab.brightness + rng.normal(0.0, 0.015, od.shape)
    return (np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def _render_corpus(*, n: int, image_size: int, seed: int) -> dict[str, np.ndarray]:
    patients = max(1, -(-n // PATCHES_PER_PATIENT))
    rng = np.random.default_rng([PUBLIC_SPACE, seed, image_size])
    patient_of = np.sort(rng.integers(0, patients, n))
    lab_of_patient = np.arange(patients) // PATIENTS_PER_LAB
    labs = {int(k): _lab(seed, int(k)) for k in np.unique(lab_of_patient)}
    labels = rng.integers(0, len(TISSUE_TYPES), n)
    images = np.stack([_render(rng, image_size, TISSUE_TYPES[t], labs[int(lab_of_patient[p])])
                       for t, p in zip(labels, patient_of)])
    return {"images": images, "labels": labels.astype(np.int64), "patient": patient_of.astype(np.int64),
            "lab": lab_of_patient[patient_of].astype(np.int64)}


@functools.lru_cache(maxsize=4)
def _corpus(n: int, image_size: int, seed: int, cache_dir: str) -> PublicCorpus:
    primitives = hashlib.sha1(Path(syn.__file__).read_bytes()).hexdigest()  # the renderer it borrows from
    key = {"n": n, "image_size": image_size, "seed": seed, "space": PUBLIC_SPACE, "primitives": primitives}
    build = functools.partial(_render_corpus, n=n, image_size=image_size, seed=seed)
    arrays = cached_arrays("public-corpus", key, build, cache_dir=Path(cache_dir), code=Path(__file__))
    return PublicCorpus(arrays["images"], arrays["labels"], TISSUE_TYPES,
                        np.array([f"public-p{int(p):05d}" for p in arrays["patient"]]),
                        np.array([f"public-lab-{int(k):03d}" for k in arrays["lab"]]))


def load_public_corpus(cfg: RunConfig, n: int, seed: int) -> PublicCorpus:
    """n public tissue-type patches at model.image-size (rendered once per machine, then read from data.cache-dir)."""
    if n <= 0:
        raise ValueError(f"the public corpus needs at least one patch (got {n})")
    return _corpus(int(n), cfg.model.image_size, int(seed), str(default_cache_dir(cfg.data.cache_dir)))
