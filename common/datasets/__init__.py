"""Dataset registry and the split types every dataset returns (FLamby style, looked up by name)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from common.datasets.splits import ArraySplit, FileSplit, SiteSplit

__all__ = ["ArraySplit", "DATASETS", "DatasetEntry", "FileSplit", "SiteSplit", "get_dataset"]


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
