"""The dataset registry (timm/FLamby style): name → the dataset module's common API, and `load_site`, the one loader.

Every dataset module exports the same names: `site_names(cfg)`, `load_split(cfg, site, split)` (no
stain handling: `load_site` attaches it, once, for every dataset), `partition(cfg)` (the audit record
of which patients each site holds) and `check(cfg)` (per-split summaries); optionally
`default_num_sites(cfg)` when the data fixes the number of sites. A new dataset is one module plus
one line here and one name in `names.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from common.datasets import breakhis, camelyon17, synthetic
from common.datasets.fixtures import FIXTURES, is_marked_synthetic
from common.datasets.names import DATASET_NAMES
from common.datasets.splits import SiteSplit
from common.datasets.stain import stain_transform

if TYPE_CHECKING:
    from common.config import RunConfig


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset module's common API: sites, splits, partition audit, data check, fixture writer."""

    site_names: Callable[..., list[str]]
    load_split: Callable[..., SiteSplit]
    partition: Callable[..., dict[str, Any]]
    check: Callable[..., list[Any]]
    write_fixture: Callable[..., Path] | None
    synthetic: bool
    default_num_sites: Callable[..., int] | None = None  # when the data fixes the site count


def _entry(name: str, module: ModuleType, *, synthetic: bool = False) -> DatasetEntry:
    return DatasetEntry(
        site_names=module.site_names, load_split=module.load_split, partition=module.partition,
        check=module.check, write_fixture=FIXTURES.get(name), synthetic=synthetic,
        default_num_sites=getattr(module, "default_num_sites", None),
    )


DATASETS: dict[str, DatasetEntry] = {
    "synthetic": _entry("synthetic", synthetic, synthetic=True),
    "breakhis": _entry("breakhis", breakhis),
    "camelyon17": _entry("camelyon17", camelyon17),
}
if tuple(DATASETS) != DATASET_NAMES:
    raise RuntimeError("common/datasets/names.py must list exactly the registered datasets")


def get_dataset(name: str) -> DatasetEntry:
    """Look a dataset up by registry name."""
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)})") from None


def load_site(cfg: RunConfig, site: int, split: str, *, augment: bool | None = None) -> SiteSplit:
    """One site's split of the configured dataset with the configured stain pipeline (jitter: training split, or `augment`)."""
    data = get_dataset(cfg.data.dataset).load_split(cfg, site, split)
    return data.with_transform(stain_transform(cfg.data, train=split == "train" if augment is None else augment))


def data_kind(dataset: str, root: str) -> str:
    """'synthetic' for generated data (the synthetic dataset or a marked tree), else 'real'."""
    return "synthetic" if get_dataset(dataset).synthetic or is_marked_synthetic(root) else "real"
