"""Per-site cache of the frozen prefix's features for the 8 flips/rotations of every image (fine-tuning recipes).

With a frozen prefix (`model.trainable` = classifier, head or last-stage) every round would push each image
through the same frozen weights again. The site computes the prefix features once for the 8 elements of
the dihedral group (horizontal flip × vertical flip × transpose: exactly the views common.training.augment
draws uniformly), keeps them in its data cache (`data.cache-dir`, on its own disk, next to the images they
come from; they never leave the site) and trains the tail on them: a random cached view is distributed
exactly like augment() applied to the pixels. The file is keyed by a hash of the frozen weights, the part,
the views and the data (array bytes, or file paths, sizes and times), so new weights or data recompute it;
deleting it only costs time. Features are stored as float16 (float32 when a value would not fit).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from common.datasets.splits import ArraySplit, FileSplit, SiteSplit
from common.trainable import Split
from common.training import make_loader, to_input

VIEWS = 8  # the dihedral group of a square patch
CACHE_VERSION = 2


@dataclass(frozen=True)
class FeatureSet:
    """Prefix features V x N x F (float16/32, CPU), the N labels, how many images were unreadable, and
    each feature row's item index in the split (to find its patient)."""

    features: torch.Tensor
    labels: torch.Tensor
    skipped: int = 0
    index: torch.Tensor | None = None

    @property
    def views(self) -> int:
        """V: views per image."""
        return int(self.features.shape[0])

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def dihedral(x: torch.Tensor, view: int) -> torch.Tensor:
    """View `view` (0..7) of images B x C x H x W: horizontal flip (bit 0), vertical flip (bit 1), transpose (bit 2)."""
    if view & 1:
        x = x.flip(-1)
    if view & 2:
        x = x.flip(-2)
    if view & 4:
        x = x.transpose(-1, -2)
    return x


def data_fingerprint(data: SiteSplit) -> str | None:
    """A hash of what the split yields (None when its type is unknown: then nothing is cached)."""
    h = hashlib.sha1()
    if isinstance(data, ArraySplit):
        h.update(memoryview(data.images.tobytes()))
    elif isinstance(data, FileSplit):
        root = data.root
        for rel in data.paths:
            try:
                st = (root / rel).stat()
                h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns};".encode())
            except OSError:
                h.update(f"{rel}|missing;".encode())
        h.update(f"{root.resolve()}|{data.image_size}".encode())
    else:
        return None
    h.update(data.labels.astype("int64").tobytes())
    h.update(_transform_stamp(data.transform).encode())
    return h.hexdigest()


def _transform_stamp(transform: Any) -> str:
    """Names and scalar settings of the deterministic per-image transforms (e.g. Macenko with its reference)."""
    if transform is None:
        return "none"
    parts = [type(transform).__name__]
    for key, value in sorted(vars(transform).items()):
        if isinstance(value, (int, float, str, bool, Path)) or value is None:
            parts.append(f"{key}={value}")
        elif isinstance(value, (list, tuple)):
            parts.append(f"{key}=[{','.join(_transform_stamp(v) for v in value)}]")
    return "(" + ";".join(parts) + ")"


def frozen_fingerprint(model: nn.Module, trainable: Iterable[str]) -> str:
    """A hash of every frozen tensor of the model (weights and statistics outside the trainable keys)."""
    skip = set(trainable)
    h = hashlib.sha1()
    for key, tensor in model.state_dict().items():
        if key in skip:
            continue
        h.update(key.encode())
        h.update(memoryview(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


@torch.no_grad()
def compute_features(model: nn.Module, split: Split, data: SiteSplit, *, views: int, device: torch.device,
                     channels_last: bool = True, batch_size: int = 64) -> FeatureSet:
    """Run the frozen prefix over every image and view (frozen modules in eval mode)."""
    was = model.training
    model.train()  # the frozen prefix is in eval mode (frozen_eval); nothing here updates statistics
    chunks: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    skipped = 0
    for images, ys, lost, index in make_loader(data, batch_size, seed=None, num_workers=0, indexed=True):
        skipped += lost
        kept.append(index)
        if ys.numel() == 0:
            continue
        x = to_input(images, device, channels_last)
        chunks.append(torch.stack([split.prefix(dihedral(x, v)).float().cpu() for v in range(views)]))
        labels.append(ys)
    model.train(was)
    if not chunks:
        raise ValueError(f"no readable images to compute features from ({skipped} unreadable)")
    feats = torch.cat(chunks, dim=1)
    small = feats.half()
    return FeatureSet(small if torch.isfinite(small).all() else feats, torch.cat(labels), skipped, torch.cat(kept))


def cached_features(model: nn.Module, split: Split, data: SiteSplit, *, views: int, device: torch.device,
                    cache_dir: Path, name: str, trainable: Iterable[str], channels_last: bool = True) -> FeatureSet:
    """compute_features, reused from `cache_dir/features/` while the frozen weights, part, views and data are unchanged."""
    data_key = data_fingerprint(data)
    if data_key is None:
        return compute_features(model, split, data, views=views, device=device, channels_last=channels_last)
    stamp = {"version": CACHE_VERSION, "part": split.part, "views": views, "width": split.width, "data": data_key,
             "frozen": frozen_fingerprint(model, trainable)}
    key = hashlib.sha1(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir / "features"
    stem = f"{_safe(name)}-{split.part.replace('+', '-')}"
    path = folder / f"{stem}__{key}.safetensors"
    if path.is_file():
        try:
            saved = load_file(str(path))
            return FeatureSet(saved["features"], saved["labels"], int(saved["skipped"].item()), saved["index"])
        except (OSError, SafetensorError, KeyError):
            pass  # a damaged cache is recomputed
    result = compute_features(model, split, data, views=views, device=device, channels_last=channels_last)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{path.stem}.{os.getpid()}.tmp"
        save_file({"features": result.features.contiguous(), "labels": result.labels.contiguous(),
                   "skipped": torch.tensor([result.skipped]),
                   "index": result.index.contiguous()}, str(tmp), metadata={"stamp": json.dumps(stamp)})
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file
        for old in folder.glob(f"{stem}__*.safetensors"):  # features of older frozen weights or data
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only cache location only costs time
    return result


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("._") or "site"
