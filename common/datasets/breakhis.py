"""BreakHis (BreaKHis_v1) reader: file names, tree index, patient-level site partition and splits.

Layout: <root>/histology_slides/breast/{benign,malignant}/SOB/<subtype dir>/<patient dir>/<NNX>/<file>.png,
file names <PROC>_<B|M>_<TYPE>-<YY>-<SLIDE>-<MAG>-<SEQ>.png. data.root may be the BreaKHis_v1
folder, the folder holding it, or .../histology_slides/breast itself.

Index (scan): every *.png below breast/ must parse and sit exactly where its name puts it (class,
procedure, subtype, patient and magnification folders). Anything else is a DatasetLayoutError
naming the file: a misplaced or misnamed image means its label cannot be trusted, so the reader
refuses instead of guessing. Non-PNG files and hidden entries (.DS_Store, macOS "._" forks) are
ignored. The walk is cached (index_cache) keyed on the root and the mtimes of breast/ and its
class/procedure/subtype folders; delete the cache after editing files in place.

Patients: the leakage unit is YY-SLIDE with letter suffixes kept (14-22549AB). Slide 14-13412 is
filed under both ductal and lobular carcinoma: it stays ONE patient id, so it is dealt to one site
and one split as a unit (it can never leak across sites or splits), while each image keeps the
subtype of its own folder as its 8-class label. Binary labels agree (both malignant).

Partition: see patients (iid / label-skew / quantity-skew over patients, then a stratified
patient split per site, and what happens to sites too small for a split). The partition uses every
patient whatever data.magnifications says, so runs at different magnifications see the same
patients per site; load_split then keeps the selected magnifications and raises a
DatasetLayoutError naming site, split and magnifications when nothing is left.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.classes import SUBTYPES
from common.datasets.index_cache import cached_index, default_cache_dir
from common.datasets.patients import SPLITS, deal, patient_classes, split_patients, subsample
from common.datasets.splits import FileSplit
from common.datasets.summary import SplitSummary, summarize
from common.errors import DatasetLayoutError

if TYPE_CHECKING:
    from common.config import RunConfig

__all__ = [
    "SUBTYPE_CODES", "SUBTYPE_DIRS", "BreakHisName", "check", "load_split", "parse_name", "partition",
    "scan", "site_names",
]

SUBTYPE_CODES: tuple[str, ...] = ("A", "F", "PT", "TA", "DC", "LC", "MC", "PC")  # = 8-class label index
SUBTYPE_DIRS: dict[str, str] = dict(zip(SUBTYPE_CODES, SUBTYPES))  # code → folder = class name
MALIGNANT: frozenset[str] = frozenset(SUBTYPE_CODES[4:])
CLASS_DIRS: dict[str, str] = {"B": "benign", "M": "malignant"}
MAGNIFICATIONS: tuple[int, ...] = (40, 100, 200, 400)
LABEL_KEYS: dict[int, str] = {2: "binary", 8: "label8"}  # model.num-classes → record field
LAYOUT: tuple[str, ...] = ("histology_slides", "breast")
EXAMPLE = "SOB_B_A-14-22549AB-100-001.png"
_NAME = re.compile(
    r"(?P<procedure>[A-Z]+)_(?P<tumor_class>[A-Z])_(?P<subtype>[A-Z]+)-(?P<year>\d{2})-"
    r"(?P<slide>\d+[A-Z]*)-(?P<mag>\d+)-(?P<seq>\d+)\.(?i:png)"
)


@dataclass(frozen=True)
class BreakHisName:
    """The fields of one BreakHis file name, e.g. SOB_M_DC-14-13412-200-010.png."""

    procedure: str
    tumor_class: str
    subtype: str
    year: str
    slide: str
    magnification: int
    seq: int

    @property
    def patient(self) -> str:
        """Leakage unit YY-SLIDE with letter suffixes kept (14-22549AB)."""
        return f"{self.year}-{self.slide}"

    @property
    def folders(self) -> tuple[str, ...]:
        """Folders below histology_slides/breast where this file belongs."""
        patient_dir = f"{self.procedure}_{self.tumor_class}_{self.subtype}_{self.patient}"
        subtype_dir = SUBTYPE_DIRS[self.subtype]
        return (CLASS_DIRS[self.tumor_class], self.procedure, subtype_dir, patient_dir, f"{self.magnification}X")

    @property
    def filename(self) -> str:
        """The canonical file name (sequence zero-padded to three digits)."""
        return (
            f"{self.procedure}_{self.tumor_class}_{self.subtype}-{self.year}-{self.slide}-"
            f"{self.magnification}-{self.seq:03d}.png"
        )


def parse_name(filename: str) -> BreakHisName:
    """Parse a BreakHis file name (a path is fine); DatasetLayoutError naming the file if it is not one."""
    match = _NAME.fullmatch(Path(filename).name)
    if match is None:
        raise DatasetLayoutError(f"cannot parse BreakHis file name '{filename}' (expected e.g. {EXAMPLE})")
    g = match.groupdict()
    name = BreakHisName(
        g["procedure"], g["tumor_class"], g["subtype"], g["year"], g["slide"], int(g["mag"]), int(g["seq"])
    )
    problem = _name_problem(name)
    if problem:
        raise DatasetLayoutError(f"bad BreakHis file name '{filename}': {problem}")
    return name


def _name_problem(name: BreakHisName) -> str:
    if name.subtype not in SUBTYPE_DIRS:
        return f"unknown subtype '{name.subtype}' (valid: {', '.join(SUBTYPE_CODES)})"
    if name.tumor_class not in CLASS_DIRS:
        return f"class '{name.tumor_class}' is neither B (benign) nor M (malignant)"
    if (name.tumor_class == "M") != (name.subtype in MALIGNANT):
        return f"class {name.tumor_class} disagrees with subtype {name.subtype}"
    if name.magnification not in MAGNIFICATIONS:
        return f"magnification {name.magnification} is not one of 40, 100, 200, 400"
    return ""


# ---- index ----------------------------------------------------------------------------------


def scan(root: Path, cache_dir: Path) -> list[dict[str, Any]]:
    """Index every image under root as {path (posix, from root), patient, subtype, label8, binary, mag}."""
    root = Path(root)
    breast = _breast_dir(root)
    return cached_index(
        root, "breakhis", lambda: _index_tree(root, breast), cache_dir=Path(cache_dir),
        stamp_files=_stamp_dirs(breast),
    )


def _breast_dir(root: Path) -> Path:
    if not root.exists():
        raise DatasetLayoutError(f"data root not found: {root}")
    if not root.is_dir():
        raise DatasetLayoutError(f"data root is not a directory: {root}")
    for candidate in (root.joinpath(*LAYOUT), root.joinpath("BreaKHis_v1", *LAYOUT)):
        if candidate.is_dir():
            return candidate
    if root.name == LAYOUT[-1]:
        return root
    raise DatasetLayoutError(
        f"no histology_slides/breast under {root} (data.root should be the BreaKHis_v1 folder, "
        "holding histology_slides/breast/{benign,malignant}/SOB/...)"
    )


STAMP_DEPTH = 5  # class / procedure / subtype / patient / magnification: a file added in any of them changes its mtime


def _stamp_dirs(breast: Path) -> tuple[Path, ...]:
    """breast/ and every folder down to the magnification folders (the images' own folders), for the index cache key."""
    below = (p for depth in range(1, STAMP_DEPTH + 1) for p in breast.glob("/".join("*" * depth)) if p.is_dir())
    return (breast, *sorted(below))


def _index_tree(root: Path, breast: Path) -> list[dict[str, Any]]:
    """Walk breast/ (the slow part that the cache saves) and validate every PNG."""
    records = [_record(path, breast, root) for path in _png_files(breast)]
    if not records:
        raise DatasetLayoutError(f"no BreakHis images (*.png) under {breast}")
    return sorted(records, key=lambda rec: rec["path"])


def _png_files(top: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        pngs = (f for f in sorted(filenames) if f.lower().endswith(".png") and not f.startswith("."))
        found += [Path(dirpath, f) for f in pngs]
    return found


def _record(path: Path, breast: Path, root: Path) -> dict[str, Any]:
    rel = path.relative_to(root).as_posix()
    name = parse_name(rel)
    if path.parent.relative_to(breast).parts != name.folders:
        expected = "/".join((*LAYOUT, *name.folders, path.name))
        raise DatasetLayoutError(f"{rel}: file is not where its name puts it (expected {expected})")
    return {
        "path": rel, "patient": name.patient, "subtype": name.subtype,
        "label8": SUBTYPE_CODES.index(name.subtype), "binary": int(name.subtype in MALIGNANT),
        "mag": f"{name.magnification}X",
    }


def _records(cfg: RunConfig) -> list[dict[str, Any]]:
    if not cfg.data.root:
        raise DatasetLayoutError("data.root is not set: point it at the BreaKHis_v1 folder")
    return scan(Path(cfg.data.root), default_cache_dir(cfg.data.cache_dir))


# ---- sites and splits -----------------------------------------------------------------------


def site_names(cfg: RunConfig) -> list[str]:
    """Names of the BreakHis sites."""
    return [f"breakhis-site-{i}" for i in range(cfg.federation.num_sites)]


def partition(cfg: RunConfig) -> dict[str, Any]:
    """JSON-able audit record: which patients each site holds in train/val/test."""
    return _partition(_records(cfg), cfg)


def _partition(records: list[dict[str, Any]], cfg: RunConfig) -> dict[str, Any]:
    data = cfg.data
    classes = patient_classes(records)
    if cfg.federation.num_sites > len(classes):
        raise ValueError(
            f"federation.num-sites ({cfg.federation.num_sites}) exceeds the {len(classes)} BreakHis "
            f"patients under {data.root}: every site needs at least one patient"
        )
    dealt = deal(classes, data.partition, cfg.federation.num_sites, data.dirichlet_alpha, data.seed)
    sites = {
        name: split_patients(
            [{"patient": p, "binary": classes[p]} for p in patients],
            seed=data.seed + i, val_fraction=data.val_fraction, test_fraction=data.test_fraction,
        )
        for i, (name, patients) in enumerate(zip(site_names(cfg), dealt))
    }
    return {
        "dataset": "breakhis", "seed": data.seed, "scheme": data.partition, "alpha": data.dirichlet_alpha,
        "magnifications": data.magnifications.split(","), "sites": sites,
    }


def _select(
    cfg: RunConfig, records: list[dict[str, Any]], audit: dict[str, Any], site: int, split: str
) -> list[dict[str, Any]]:
    """Records of one site's split at the selected magnifications, subsampled to data.max-per-site."""
    names = site_names(cfg)
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    if not 0 <= site < len(names):
        raise ValueError(f"site {site} out of range: federation.num-sites is {len(names)}")
    patients = set(audit["sites"][names[site]][split])
    mags = set(cfg.data.magnifications.split(","))
    chosen = [rec for rec in records if rec["patient"] in patients and rec["mag"] in mags]
    rng = np.random.default_rng([cfg.data.seed, site, SPLITS.index(split)])
    keep = subsample([rec["label8"] for rec in chosen], cfg.data.max_per_site, rng)
    return [chosen[i] for i in keep]


def _file_split(cfg: RunConfig, chosen: list[dict[str, Any]]) -> FileSplit:
    labels = [rec[LABEL_KEYS[cfg.model.num_classes]] for rec in chosen]
    return FileSplit(
        Path(cfg.data.root), [rec["path"] for rec in chosen], labels, cfg.model.image_size, strict=cfg.data.strict,
        patients=[rec["patient"] for rec in chosen],
    )


def load_split(cfg: RunConfig, site: int, split: str) -> FileSplit:
    """One site's train/val/test images (lazy FileSplit); labels binary or 8-class per model.num-classes."""
    records = _records(cfg)
    audit = _partition(records, cfg)
    chosen = _select(cfg, records, audit, site, split)
    if not chosen:
        name = site_names(cfg)[site]
        count = len(audit["sites"][name][split])
        raise DatasetLayoutError(
            f"site {name} has no '{split}' images at {cfg.data.magnifications} "
            f"({count} patients in that split; try fewer sites or other fractions)"
        )
    return _file_split(cfg, chosen)


def check(cfg: RunConfig) -> list[SplitSummary]:
    """Per site and split: images per class, patients, unreadable files (every image is opened)."""
    records = _records(cfg)
    audit = _partition(records, cfg)
    out = []
    for site, name in enumerate(site_names(cfg)):
        for split in SPLITS:
            chosen = _select(cfg, records, audit, site, split)
            patients = [rec["patient"] for rec in chosen]
            out.append(summarize(name, split, _file_split(cfg, chosen), patients, read=True))
    return out
