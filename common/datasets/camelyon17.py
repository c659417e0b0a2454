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

from common.datasets.index_cache import cached_index, default_cache_dir
from common.datasets.patients import SPLITS, split_by_ratio, subsample
from common.datasets.splits import FileSplit
from common.datasets.summary import SplitSummary, summarize
from common.errors import ConfigError, DatasetLayoutError

if TYPE_CHECKING:
    from common.config import RunConfig

DATASET = "camelyon17"
FOLDER = "camelyon17_v1.0"
METADATA = "metadata.csv"
COLUMNS = ("patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split")
# Anonymised hospitals of CAMELYON17 (Bandi et al. 2019): Radboud UMC, Canisius-Wilhelmina Hospital,
# UMC Utrecht, Rijnstate Hospital, Laboratorium Pathologie Oost-Nederland.
CENTER_HOSPITALS = {0: "RUMC", 1: "CWZ", 2: "UMCU", 3: "RST", 4: "LPON"}
OFFICIAL = {"train": (0, 3, 4), "val_ood": (1,), "test": (2,)}
PATIENTS_PER_CENTER = 20  # center = patient // 20


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


def _center_records(records: list[dict[str, Any]], center: int) -> list[dict[str, Any]]:
    return [r for r in records if r["center"] == center]


def _center_split(cfg: RunConfig, records: list[dict[str, Any]], center: int) -> dict[str, list[str]]:
    return split_by_ratio(_center_records(records, center), seed=(cfg.data.seed, center),
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


def _subsample(rows: list[dict[str, Any]], limit: int, seed: tuple[int, ...]) -> list[dict[str, Any]]:
    """At most `limit` rows (0 = all), tumor/normal in proportion (patients.subsample); order kept."""
    return [rows[i] for i in subsample([r["tumor"] for r in rows], limit, np.random.default_rng(seed))]


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
    return folder, _subsample(rows, cfg.data.max_per_site, (cfg.data.seed, center, SPLITS.index(split)))


def _file_split(cfg: RunConfig, folder: Path, rows: list[dict[str, Any]]) -> FileSplit:
    return FileSplit(folder, [r["path"] for r in rows], [r["tumor"] for r in rows], cfg.model.image_size,
                     strict=cfg.data.strict, patients=[r["patient"] for r in rows])


def load_split(cfg: RunConfig, site: int, split: str) -> FileSplit:
    """One site's train/val/test patches (lazy; unreadable files yield None unless data.strict)."""
    folder, rows = _site_records(cfg, site, split)
    if not rows:
        raise DatasetLayoutError(
            f"site center-{site_centers(cfg)[site]} has no '{split}' patches in {folder / METADATA} "
            "(too few patients for this split, or the center is absent)"
        )
    return _file_split(cfg, folder, rows)


def load_center(cfg: RunConfig, center: int) -> FileSplit:
    """Every patch of one center (e.g. 2 = WILDS OOD test hospital), subsampled by data.max-per-site."""
    if center not in CENTER_HOSPITALS:
        raise ValueError(f"center must be 0-4 (got {center})")
    folder, records = _records(cfg)
    rows = _subsample(_center_records(records, center), cfg.data.max_per_site, (cfg.data.seed, center, len(SPLITS)))
    if not rows:
        raise DatasetLayoutError(f"center {center} has no patches in {folder / METADATA}")
    return _file_split(cfg, folder, rows)


def check(cfg: RunConfig) -> list[SplitSummary]:
    """Summarise every site and split, opening each patch to count unreadable ones."""
    out = []
    for site, center in enumerate(site_centers(cfg)):
        for split in SPLITS:
            folder, rows = _site_records(cfg, site, split)
            data = FileSplit(folder, [r["path"] for r in rows], [r["tumor"] for r in rows], cfg.model.image_size)
            out.append(summarize(f"center-{center}", split, data, [r["patient"] for r in rows], read=True))
    return out
