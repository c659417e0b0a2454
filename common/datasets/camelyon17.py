"""Camelyon17-WILDS (camelyon17_v1.0) reader: each hospital (center) is one federated site, split patient-disjointly.

Layout: `<root>/metadata.csv` (unnamed index column, then patient, node, x_coord, y_coord, tumor, slide,
center, split) and `<root>/patches/patient_<PPP>_node_<N>/patch_patient_<PPP>_node_<N>_x_<X>_y_<Y>.png`
(96 x 96 RGBA, converted to RGB). Label = tumor (binary only). `root` may also be the folder holding
`camelyon17_v1.0/`.

Sites: `data.centers` lists the centers used as sites in site order (site i = i-th listed center);
`federation.num-sites` must equal their number. Within a center, patients (the leakage unit: all
nodes/slides of a patient stay together) are dealt to train/val/test by `data.val-fraction` /
`data.test-fraction`, seeded and stratified by tumor ratio. A center with few patients: test gets
>= 1 patient (if >= 2 patients), val gets >= 1 only if >= 3 patients (else val is empty), train always
keeps >= 1; a single-patient center is train only. The metadata `split` column (WILDS' in-distribution
val) is a patch-level split that mixes patients, so it is kept in the records but not used.

Official WILDS protocol (domain generalisation): train on centers 0, 3, 4 (`data.centers="0,3,4"`,
`federation.num-sites=3`), select models on the OOD validation hospital (center 1) and report on the
held-out test hospital (center 2) with `load_center(cfg, 1)` / `load_center(cfg, 2)`, which return
every patch of that center regardless of `data.centers`.
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from common.datasets.index_cache import cached_index, default_cache_dir
from common.datasets.report import DatasetLayoutError, SplitSummary, summarize
from common.datasets.splits import FileSplit

if TYPE_CHECKING:
    from common.config import RunConfig

DATASET = "camelyon17"
FOLDER = "camelyon17_v1.0"
METADATA = "metadata.csv"
COLUMNS = ("patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split")
SPLITS = ("train", "val", "test")
# Anonymised hospitals of CAMELYON17 (Bandi et al. 2019): Radboud UMC, Canisius-Wilhelmina Hospital,
# UMC Utrecht, Rijnstate Hospital, Laboratorium Pathologie Oost-Nederland.
CENTER_HOSPITALS = {0: "RUMC", 1: "CWZ", 2: "UMCU", 3: "RST", 4: "LPON"}
OFFICIAL = {"train": (0, 3, 4), "val_ood": (1,), "test": (2,)}
PATIENTS_PER_CENTER = 20  # center = patient // 20
_CANDIDATES = 256  # seeded patient permutations scored for tumor-ratio stratification


# ---- metadata -------------------------------------------------------------------------------


def patch_path(patient: str, node: int, x: int, y: int) -> str:
    """Relative posix path of one patch, exactly as the WILDS release names it."""
    stem = f"patient_{patient}_node_{node}"
    return f"patches/{stem}/patch_{stem}_x_{x}_y_{y}.png"


def dataset_dir(root: Path) -> Path:
    """The camelyon17_v1.0 folder: root itself, or root/camelyon17_v1.0 when only that holds metadata."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"Camelyon17 root not found: {root}")
    if not (root / METADATA).is_file() and (root / FOLDER / METADATA).is_file():
        return root / FOLDER
    if not (root / METADATA).is_file():
        raise DatasetLayoutError(f"{root / METADATA} not found (is data.root the {FOLDER} folder?)")
    return root


def read_metadata(root: Path, *, cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """Validated metadata records (patient, node, x, y, tumor, slide, center, split, path), cached as JSON."""
    folder = dataset_dir(root)
    meta = folder / METADATA
    return cached_index(
        folder, DATASET, lambda: _parse_metadata(meta),
        cache_dir=cache_dir or default_cache_dir(), stamp_files=(meta,),
    )


def _parse_metadata(meta: Path) -> list[dict[str, Any]]:
    try:
        with meta.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            _check_columns(meta, reader.fieldnames)
            return [_record(meta, i, row) for i, row in enumerate(reader, start=1)]
    except (UnicodeDecodeError, csv.Error) as err:
        raise DatasetLayoutError(f"{meta}: not a readable CSV ({err})") from None


def _check_columns(meta: Path, header: list[str] | None) -> None:
    if not header:
        raise DatasetLayoutError(f"{meta}: empty file (no header row)")
    for column in COLUMNS:
        if column not in header:
            raise DatasetLayoutError(f"{meta}: missing column '{column}'")


def _int(meta: Path, row: int, row_data: dict[str, str], column: str) -> int:
    value = (row_data.get(column) or "").strip()
    try:
        return int(value)
    except ValueError:
        raise DatasetLayoutError(f"{meta}: row {row} column '{column}': expected an integer, got {value!r}") from None


def _record(meta: Path, row: int, data: dict[str, str]) -> dict[str, Any]:
    rec: dict[str, Any] = {
        key: _int(meta, row, data, col) for key, col in
        (("node", "node"), ("x", "x_coord"), ("y", "y_coord"), ("tumor", "tumor"),
         ("slide", "slide"), ("center", "center"), ("split", "split"))
    }
    # kept as the zero-padded string the patch folders use; a re-saved "4" is padded back to "004"
    rec["patient"] = str(_int(meta, row, data, "patient")).zfill(3)
    if rec["center"] not in CENTER_HOSPITALS:
        raise DatasetLayoutError(f"{meta}: row {row} column 'center': {rec['center']} is outside 0-4")
    if rec["tumor"] not in (0, 1):
        raise DatasetLayoutError(f"{meta}: row {row} column 'tumor': {rec['tumor']} is not 0 or 1")
    rec["path"] = patch_path(rec["patient"], rec["node"], rec["x"], rec["y"])
    return rec


@functools.lru_cache(maxsize=2)
def _memo_records(folder: str, cache_dir: str, stamp: tuple[int, int]) -> list[dict[str, Any]]:
    return read_metadata(Path(folder), cache_dir=Path(cache_dir))


def _records(cfg: RunConfig) -> tuple[Path, list[dict[str, Any]]]:
    """The dataset folder and its records, memoised per process while metadata.csv is unchanged."""
    if not cfg.data.root:
        raise DatasetLayoutError(f"data.root is empty: set it to the {FOLDER} folder")
    folder = dataset_dir(Path(cfg.data.root)).resolve()
    st = (folder / METADATA).stat()
    cache = str(default_cache_dir(cfg.data.cache_dir))
    return folder, _memo_records(str(folder), cache, (st.st_mtime_ns, st.st_size))


# ---- sites and splits -----------------------------------------------------------------------


def default_num_sites(cfg: RunConfig) -> int:
    """Each listed center is one site."""
    return len(cfg.data.centers.split(","))


def site_centers(cfg: RunConfig) -> list[int]:
    """The centers used as sites, in site order, after checking the config fits Camelyon17."""
    from common.config import ConfigError

    listed = [int(c) for c in cfg.data.centers.split(",")]
    if cfg.model.num_classes != 2:
        raise ConfigError(
            f"Camelyon17 is binary (tumor / normal): set model.num-classes=2 (got {cfg.model.num_classes})"
        )
    if cfg.federation.num_sites != len(listed):
        raise ConfigError(
            f"federation.num-sites ({cfg.federation.num_sites}) must equal the number of "
            f"data.centers ({len(listed)}: '{cfg.data.centers}')"
        )
    return listed


def site_names(cfg: RunConfig) -> list[str]:
    """One site per listed center, in the given order."""
    return [f"center-{c}" for c in site_centers(cfg)]


def official_split(records: list[dict[str, Any]]) -> dict[str, list[int]]:
    """WILDS roles of the centers present: train (0, 3, 4), OOD validation (1), test (2)."""
    present = {int(r["center"]) for r in records}
    return {role: [c for c in group if c in present] for role, group in OFFICIAL.items()}


def split_patients(records: list[dict[str, Any]], *, seed: int, center: int,
                   val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    """Deal one center's patients to train/val/test, seeded, stratified by tumor ratio, never overlapping."""
    tumor: dict[str, list[int]] = {}
    for r in records:
        tumor.setdefault(r["patient"], [0, 0])
        tumor[r["patient"]][0] += int(r["tumor"])
        tumor[r["patient"]][1] += 1
    patients = sorted(tumor)
    n_test, n_val = _split_sizes(len(patients), val_fraction, test_fraction)
    counts = np.array([tumor[p] for p in patients], dtype=np.float64).reshape(-1, 2)
    rng = np.random.default_rng([seed, center])
    order = min((rng.permutation(len(patients)) for _ in range(_CANDIDATES)),
                key=lambda perm: _imbalance(counts, perm, n_test, n_val))
    bounds = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {split: sorted(patients[i] for i in bounds[split]) for split in SPLITS}


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(test, val) patient counts: test >= 1 and val >= 1 (when asked) only while train keeps >= 1."""
    if n < 2:
        return 0, 0
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    if val_fraction <= 0 or n - n_test < 2:
        return n_test, 0
    return n_test, min(max(1, round(n * val_fraction)), n - n_test - 1)


def _imbalance(counts: np.ndarray, perm: np.ndarray, n_test: int, n_val: int) -> float:
    overall = counts[:, 0].sum() / max(counts[:, 1].sum(), 1.0)
    parts = (perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:])
    ratios = [counts[p, 0].sum() / counts[p, 1].sum() for p in parts if len(p) and counts[p, 1].sum()]
    return float(sum(abs(r - overall) for r in ratios))


def _center_records(records: list[dict[str, Any]], center: int) -> list[dict[str, Any]]:
    return [r for r in records if r["center"] == center]


def _center_split(cfg: RunConfig, records: list[dict[str, Any]], center: int) -> dict[str, list[str]]:
    return split_patients(_center_records(records, center), seed=cfg.data.seed, center=center,
                          val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction)


def partition(cfg: RunConfig) -> dict[str, Any]:
    """JSON-able audit record of which patients every site holds in each split."""
    listed = site_centers(cfg)
    _, records = _records(cfg)
    sites = {
        f"center-{c}": {"center": c, "hospital": CENTER_HOSPITALS[c], **_center_split(cfg, records, c)}
        for c in listed
    }
    return {
        "dataset": DATASET, "seed": cfg.data.seed, "centers": listed,
        "val_fraction": cfg.data.val_fraction, "test_fraction": cfg.data.test_fraction,
        "official_split": {role: list(group) for role, group in OFFICIAL.items()},
        "sites": sites,
    }


def subsample(records: list[dict[str, Any]], limit: int, seed: list[int]) -> list[dict[str, Any]]:
    """At most `limit` records (0 = all), drawn per class in proportion to its share; order kept."""
    if limit <= 0 or len(records) <= limit:
        return records
    labels = np.array([r["tumor"] for r in records])
    rng = np.random.default_rng(seed)
    normal, tumor = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    take_normal = min(len(normal), max(limit - len(tumor), round(limit * len(normal) / len(records))))
    keep = [*rng.choice(normal, take_normal, replace=False), *rng.choice(tumor, limit - take_normal, replace=False)]
    return [records[i] for i in sorted(keep)]


def _site_records(cfg: RunConfig, site: int, split: str) -> tuple[Path, list[dict[str, Any]]]:
    """The (subsampled) records of one site's split; may be empty."""
    listed = site_centers(cfg)
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    if not 0 <= site < len(listed):
        raise ValueError(f"site {site} out of range: data.centers '{cfg.data.centers}' gives sites 0-{len(listed) - 1}")
    folder, records = _records(cfg)
    center = listed[site]
    chosen = set(_center_split(cfg, records, center)[split])
    rows = [r for r in _center_records(records, center) if r["patient"] in chosen]
    return folder, subsample(rows, cfg.data.max_per_site, [cfg.data.seed, center, SPLITS.index(split)])


def _file_split(cfg: RunConfig, folder: Path, rows: list[dict[str, Any]], *, train: bool) -> FileSplit:
    from common.stain import stain_transform

    return FileSplit(folder, [r["path"] for r in rows], [r["tumor"] for r in rows], cfg.model.image_size,
                     strict=cfg.data.strict, transform=stain_transform(cfg.data, train=train))


def load_split(cfg: RunConfig, site: int, split: str) -> FileSplit:
    """One site's train/val/test patches (lazy; unreadable files yield None unless data.strict)."""
    folder, rows = _site_records(cfg, site, split)
    if not rows:
        raise DatasetLayoutError(
            f"site center-{site_centers(cfg)[site]} has no '{split}' patches in {folder / METADATA} "
            "(too few patients for this split, or the center is absent)"
        )
    return _file_split(cfg, folder, rows, train=split == "train")


def load_center(cfg: RunConfig, center: int) -> FileSplit:
    """Every patch of one center (e.g. 2 = WILDS OOD test hospital), subsampled by data.max-per-site."""
    if center not in CENTER_HOSPITALS:
        raise ValueError(f"center must be 0-4 (got {center})")
    folder, records = _records(cfg)
    rows = subsample(_center_records(records, center), cfg.data.max_per_site, [cfg.data.seed, center, len(SPLITS)])
    if not rows:
        raise DatasetLayoutError(f"center {center} has no patches in {folder / METADATA}")
    return _file_split(cfg, folder, rows, train=False)


def check(cfg: RunConfig) -> list[SplitSummary]:
    """Summarise every site and split, opening each patch to count unreadable ones."""
    out = []
    for site, center in enumerate(site_centers(cfg)):
        for split in SPLITS:
            folder, rows = _site_records(cfg, site, split)
            data = FileSplit(folder, [r["path"] for r in rows], [r["tumor"] for r in rows], cfg.model.image_size)
            out.append(summarize(f"center-{center}", split, data, [r["patient"] for r in rows], read=True))
    return out


# ---- fixture --------------------------------------------------------------------------------


def write_fixture(root: Path, *, patients_per_center: int = 2, nodes_per_patient: int = 1,
                  patches_per_node: int = 6, size: int = 96, seed: int = 0) -> Path:
    """Write a small layout-faithful SYNTHETIC camelyon17_v1.0 tree under root and return its path."""
    from common.datasets.synthetic import SUBTYPES, hospital, render

    if not 1 <= patients_per_center <= PATIENTS_PER_CENTER or not 1 <= nodes_per_patient <= 5:
        raise ValueError("write_fixture: 1-20 patients per center and 1-5 nodes per patient")
    folder = Path(root) / FOLDER
    rows = []
    for center in CENTER_HOSPITALS:
        hosp = hospital(center, len(CENTER_HOSPITALS), seed)
        for k in range(patients_per_center):
            patient = f"{PATIENTS_PER_CENTER * center + k:03d}"
            for node in range(nodes_per_patient):
                rng = np.random.default_rng([seed, center, k, node])
                tumors = rng.permutation(np.arange(patches_per_node) % 2)
                for j, tumor in enumerate(tumors):
                    x, y = 96 * (10 + j), 96 * (20 + int(rng.integers(0, 100)))
                    morph = SUBTYPES[int(rng.integers(4, 8)) if tumor else int(rng.integers(0, 4))]
                    _save_rgba(folder / patch_path(patient, node, x, y), render(rng, size, morph, hosp))
                    in_dist_val = center in OFFICIAL["train"] and j % 5 == 4
                    rows.append([patient, node, x, y, int(tumor), len(rows) // patches_per_node,
                                 center, int(in_dist_val)])
    _write_metadata(folder / METADATA, rows)
    return folder


def _save_rgba(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    alpha = np.full(rgb.shape[:2] + (1,), 255, dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=2)).save(path)  # H x W x 4 -> RGBA


def _write_metadata(path: Path, rows: list[list[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["", *COLUMNS])
        writer.writerows([i, *row] for i, row in enumerate(rows))
