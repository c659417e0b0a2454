"""Batched prediction through the training DataLoader path: class probabilities (and attention) per readable item.

Items are indexed by their LABEL: every split handed to `predict` carries labels 0..N-1, so the index of
each readable image survives `collate_skipping` and unreadable ones are known by what is missing. The
loader is read one batch ahead in a background thread (decoding, tile reading and the forward overlap).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from common.datasets.splits import SiteSplit
from common.model import HybridEffNetGRU
from common.training import _autocast, make_loader, prepare, to_input

T = TypeVar("T")
Adapter = Callable[[nn.Module, DataLoader], Any]  # label-free adaptation hook, e.g. common.adabn.adapt_batchnorm


@dataclass(frozen=True)
class Batch:
    """One predicted batch: item indices, probabilities B x K, attention B x h x w (when asked), uint8 images."""

    index: np.ndarray
    probs: np.ndarray
    attention: np.ndarray | None
    images: np.ndarray | None
    skipped: int


def has_attention(model: nn.Module) -> bool:
    """Whether the model returns an attention map (the hybrid; not the paper's baselines)."""
    return isinstance(model, HybridEffNetGRU)


def background(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate `items` in a worker thread, `depth` items ahead (exceptions re-raised here)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def fill() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            q.put(err)
            return
        q.put(done)

    worker = threading.Thread(target=fill, daemon=True)
    worker.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)


def loader_for(data: SiteSplit, batch_size: int, device: torch.device, num_workers: int = -1) -> DataLoader:
    """The training loader over a split in order (no shuffling), pinned on CUDA."""
    return make_loader(data, batch_size, seed=None, num_workers=num_workers, pin_memory=device.type == "cuda")


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable, device: torch.device, *, attention: bool = False, amp: bool = True,
    keep_images: bool = False, adapt: Adapter | None = None, adapt_loader: DataLoader | None = None,
) -> Iterator[Batch]:
    """Per batch of (uint8 images, indices, skipped): softmax probabilities, optionally attention and the images.

    `adapt(model, adapt_loader)` runs first when given (label-free normalisation-statistics adaptation).
    """
    model = prepare(model, device)
    if adapt is not None:
        adapt(model, adapt_loader if adapt_loader is not None else loader)
    model.eval()
    attention = attention and has_attention(model)
    for images, index, skipped in background(loader):
        if index.numel() == 0:
            yield Batch(np.zeros(0, np.int64), np.zeros((0, model.num_classes), np.float32), None, None, skipped)
            continue
        with _autocast(device, amp):
            out = model(to_input(images, device), return_attention=True) if attention else model(to_input(images, device))
        logits, attn = out if attention else (out, None)
        probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        yield Batch(index.numpy(), probs, attn.float().cpu().numpy() if attn is not None else None,
                    images.numpy() if keep_images else None, skipped)
