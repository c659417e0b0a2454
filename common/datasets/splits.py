"""Split types: in-memory arrays (synthetic) and lazily read image files (real datasets)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.datasets.images import BadImageError, read_rgb, to_square

log = logging.getLogger(__name__)
Transform = Callable[[np.ndarray], np.ndarray]


class SiteSplit(Dataset):
    """One site's split: item i is (uint8 H x W x 3 image or None if unreadable, label).

    `patients[i]` is item i's patient identifier when the data has patients (None otherwise); it never
    leaves the site: evaluation turns it into per-patient sums (common.metrics.patient_summary).
    """

    labels: np.ndarray
    transform: Transform | None = None
    patients: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def with_transform(self, transform: Transform | None) -> SiteSplit:
        """A copy that applies this per-image transform (the data itself is shared, never copied)."""
        if transform is None:
            return self
        out = copy.copy(self)
        out.transform = transform
        return out


class ArraySplit(SiteSplit):
    """Images already in memory (N x H x W x 3 uint8)."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, transform: Transform | None = None, *,
        patients: Sequence[str] | None = None,
    ) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.patients = _patients(patients, self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, int]:
        image = self.images[i]
        return (self.transform(image) if self.transform else image), int(self.labels[i])


class FileSplit(SiteSplit):
    """Image files read on demand, converted to RGB and resized/cropped to image_size.

    Unreadable files yield None (skipped and counted by the loader) unless strict, which raises.
    """

    def __init__(
        self, root: Path, paths: Sequence[str], labels: Sequence[int], image_size: int, *,
        strict: bool = False, transform: Transform | None = None, patients: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size = image_size
        self.strict = strict
        self.transform = transform
        self.patients = _patients(patients, self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, int]:
        try:
            image = to_square(read_rgb(self.root / self.paths[i]), self.image_size)
        except BadImageError as err:
            if self.strict:
                raise
            log.warning("skipping unreadable image: %s", err)
            return None, int(self.labels[i])
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def _patients(patients: Sequence[str] | None, labels: np.ndarray) -> np.ndarray | None:
    if patients is None:
        return None
    out = np.asarray([str(p) for p in patients])
    if out.shape != labels.shape:
        raise ValueError(f"{out.size} patient identifiers for {labels.size} images")
    return out


class IndexedSplit(Dataset):
    """A split whose item i is (image or None, label, i): evaluation knows which images it read."""

    def __init__(self, data: SiteSplit) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, int, int]:
        image, label = self.data[i]
        return image, label, i


def collate_indexed(batch: list[tuple[np.ndarray | None, int, int]]) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """collate_skipping for IndexedSplit items, plus the indices of the images kept."""
    images, labels, skipped = collate_skipping([(img, lab) for img, lab, _ in batch])
    return images, labels, skipped, torch.tensor([i for img, _, i in batch if img is not None], dtype=torch.int64)


def collate_skipping(batch: list[tuple[np.ndarray | None, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack readable images into B x H x W x 3 uint8 and labels; count the skipped ones."""
    good = [(img, lab) for img, lab in batch if img is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), skipped
    images = torch.from_numpy(np.stack([img for img, _ in good]))
    return images, torch.tensor([lab for _, lab in good], dtype=torch.int64), skipped
