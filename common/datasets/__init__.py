"""Dataset registry: name → module exposing the same site-data API (FLamby style, no string imports)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SiteSplit:
    """One site's images (N x H x W x 3, uint8) and integer labels for one split."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class DatasetEntry:
    """How to list a dataset's sites and load one site's split."""

    site_names: Callable[..., list[str]]
    load_split: Callable[..., SiteSplit]
    synthetic: bool


def _synthetic_entry() -> DatasetEntry:
    from common.datasets import synthetic

    return DatasetEntry(synthetic.site_names, synthetic.load_split, synthetic=True)


DATASETS: dict[str, Callable[[], DatasetEntry]] = {"synthetic": _synthetic_entry}


def get_dataset(name: str) -> DatasetEntry:
    """Look a dataset up by registry name."""
    try:
        return DATASETS[name]()
    except KeyError:
        raise KeyError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)})") from None
