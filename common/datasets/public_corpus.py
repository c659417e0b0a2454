"""The embedded PUBLIC pretraining corpus: synthetic H&E tissue-type patches from labs and patients that no site holds.

SYNTHETIC. Pretraining (common/pretrain.py) needs data that is public and not the hospitals' task: this
corpus is labelled with tissue types and nuclear morphometry (what public nucleus-annotated corpora such as
MoNuSeg or PanNuke let a model learn: nuclei per area, nuclear area and its spread, vesicular chromatin,
nucleolated and mitotic shares, dark-chromatin share), never with the malignancy label or a subtype. Its labs (stain and
scanner profiles) and patients are drawn from their own seed space (`PUBLIC_SPACE`), so no lab or patient
coincides with a simulated hospital's; patient ids are
`public-p…`, lab ids `public-lab-…`. Patches come from the same tissue renderer as the hospitals
(common/datasets/tissue/, any of the 8 architectures); each is labelled by the compartment that covers
most of it (stroma, epithelium, white space: lumen, fat, background; pale matrix: mucin, myxoid) and measured
by `tissue.nuclei.morphometry` (descriptive measurements of the painted nuclei, no diagnosis). Rendered
corpora are cached on disk like the synthetic sites (`data.cache-dir`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.datasets import synthetic
from common.datasets.cohort import Hospital, hospital, slide_stain
from common.datasets.index_cache import cached_arrays, default_cache_dir
from common.datasets.tissue import MORPHOMETRY, SUBTYPES, canvas, draw_patch, sample_biology

if TYPE_CHECKING:
    from common.config import RunConfig

PUBLIC_SPACE = 0x5EED_0F_9B  # first seed word of every public draw: site draws start with data.seed instead
PATIENTS_PER_LAB = 12
PATCHES_PER_PATIENT = 20


@dataclass(frozen=True)
class PublicCorpus:
    """Images N x H x W x 3 uint8, tissue labels N, label names, nuclear morphometry N x M, patient and lab of each patch."""

    images: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]
    patients: np.ndarray  # str ids 'public-p00012'
    labs: np.ndarray  # str ids 'public-lab-003'
    morphometry: np.ndarray  # float32 N x len(MORPHOMETRY)
    measures: tuple[str, ...] = MORPHOMETRY

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# tissue type → the compartments (common/datasets/tissue/canvas.py) that count for it
TISSUES: dict[str, tuple[int, ...]] = {
    "stroma": (canvas.STROMA, canvas.DENSE, canvas.RBC),
    "epithelium": (canvas.EPI,),
    "white space": (canvas.WHITE, canvas.FAT_WALL),
    "pale matrix": (canvas.MUCIN, canvas.MYXOID, canvas.SECRETION),
}
TISSUE_TYPES: tuple[str, ...] = tuple(TISSUES)


def tissue_type(comp: np.ndarray) -> int:
    """Index into TISSUE_TYPES of the tissue covering most of a compartment map."""
    counts = np.bincount(comp.ravel(), minlength=256)
    return int(np.argmax([counts[list(codes)].sum() for codes in TISSUES.values()]))


def _lab(seed: int, lab: int, labs: int) -> Hospital:
    """A public lab's stain and scanner profile, drawn in its own seed space (no simulated hospital's)."""
    return hospital(lab, max(labs, 2), PUBLIC_SPACE + seed)


def _render_corpus(*, n: int, image_size: int, seed: int) -> dict[str, np.ndarray]:
    patients = max(1, -(-n // PATCHES_PER_PATIENT))
    rng = np.random.default_rng([PUBLIC_SPACE, seed, image_size])
    patient_of = np.sort(rng.integers(0, patients, n))
    lab_of_patient = np.arange(patients) // PATIENTS_PER_LAB
    count = int(lab_of_patient.max()) + 1
    labs = [_lab(seed, k, count) for k in range(count)]
    people = []
    for p in range(patients):  # each public patient: one lesion architecture, own biology and slide stain
        prng = np.random.default_rng([PUBLIC_SPACE, seed, 1, p])
        subtype = int(prng.integers(0, len(SUBTYPES)))
        people.append((subtype, sample_biology(prng, SUBTYPES[subtype].malignant),
                       slide_stain(prng, labs[lab_of_patient[p]].stain)))
    images, labels, measured = [], [], []
    for j, p in enumerate(patient_of):
        subtype, bio, stain = people[p]
        image, comp, morph = draw_patch(np.random.default_rng([PUBLIC_SPACE, seed, 2, j, image_size]), image_size,
                                        subtype, bio, stain, labs[lab_of_patient[p]].scanner)
        images.append(image)
        labels.append(tissue_type(comp))
        measured.append(morph)
    return {"images": np.stack(images), "labels": np.asarray(labels, np.int64), "patient": patient_of.astype(np.int64),
            "lab": lab_of_patient[patient_of].astype(np.int64), "morphometry": np.stack(measured).astype(np.float32)}


@functools.lru_cache(maxsize=4)
def _corpus(n: int, image_size: int, seed: int, cache_dir: str) -> PublicCorpus:
    key = {"n": n, "image_size": image_size, "seed": seed, "space": PUBLIC_SPACE}
    build = functools.partial(_render_corpus, n=n, image_size=image_size, seed=seed)
    arrays = cached_arrays("public-corpus", key, build, cache_dir=Path(cache_dir), code=source_files())
    return PublicCorpus(arrays["images"], arrays["labels"], TISSUE_TYPES,
                        np.array([f"public-p{int(p):05d}" for p in arrays["patient"]]),
                        np.array([f"public-lab-{int(k):03d}" for k in arrays["lab"]]), arrays["morphometry"])


def load_public_corpus(cfg: RunConfig, n: int, seed: int) -> PublicCorpus:
    """n public tissue-type + morphometry patches at model.image-size (rendered once per machine, then read from data.cache-dir)."""
    if n <= 0:
        raise ValueError(f"the public corpus needs at least one patch (got {n})")
    return _corpus(int(n), cfg.model.image_size, int(seed), str(default_cache_dir(cfg.data.cache_dir)))


def source_files() -> list[Path]:
    """This module and the renderer's source (the corpus cache and the cached pretraining hash them)."""
    return [Path(__file__), *synthetic.source_files()]
