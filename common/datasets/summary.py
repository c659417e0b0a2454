"""Data checks shared by the dataset readers: per-site/split summaries (images per class, patients, unreadable files)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.datasets.images import BadImageError, read_rgb
from common.datasets.splits import FileSplit


@dataclass
class SplitSummary:
    """What `flower-client check-data` prints for one site and split."""

    site: str
    split: str
    images_per_class: dict[int, int]
    patients: int
    unreadable: list[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(self.images_per_class.values())


def summarize(site: str, split: str, data: FileSplit, patients: Sequence[str], *, read: bool = True) -> SplitSummary:
    """Count images per class and patients; with read=True open every image to find unreadable ones."""
    unreadable = []
    if read:
        for rel in data.paths:
            try:
                read_rgb(data.root / rel)
            except BadImageError:
                unreadable.append(rel)
    counts = Counter(int(v) for v in data.labels)
    return SplitSummary(site, split, dict(sorted(counts.items())), len(set(patients)), unreadable)
