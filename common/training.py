"""One local training loop and one evaluation loop, shared by every client (and later pooled/local baselines)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from common.config import TrainConfig
from common.datasets.splits import ArraySplit, IndexedSplit, SiteSplit, collate_indexed, collate_skipping
from common.metrics import EvalResult, confusion_matrix, patient_summary, score_histograms

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {  # (params, lr, weight decay, momentum)
    "adamw": lambda params, lr, wd, momentum=0.9: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd, momentum=0.9: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd),
}

SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler | None]] = {  # (optimizer, steps) -> per-step scheduler or None
    "constant": lambda opt, steps: None,
    "cosine": lambda opt, steps: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps)),
}


@dataclass(frozen=True)
class TrainResult:
    """What one site's local training produced."""

    loss: float
    num_examples: int
    seconds: float
    skipped: int = 0
    steps: int = 0  # optimizer steps taken (SCAFFOLD's K)


def select_device(name: str) -> torch.device:
    """'auto' → CUDA when present, else CPU; 'cuda' without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare(model: nn.Module, device: torch.device, *, channels_last: bool = True) -> nn.Module:
    """Move the model to the device, channels_last by default (+45 % CPU training img/s here).

    On CUDA, cuDNN autotunes its kernels (inputs keep one size, so the search is paid once per process).
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def to_input(images: np.ndarray | torch.Tensor, device: torch.device, channels_last: bool = True) -> torch.Tensor:
    """uint8 N x H x W x 3 → normalised float N x 3 x H x W on the device (channels_last strides by default)."""
    x = torch.as_tensor(images).to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - IMAGENET_MEAN.to(device)) / IMAGENET_STD.to(device)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random horizontal/vertical flips and 90° rotations (histology has no orientation)."""
    n = x.shape[0]
    flip_h = torch.rand(n, generator=gen) < 0.5
    flip_v = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip_h.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    x = torch.where(flip_v.view(-1, 1, 1, 1).to(x.device), x.flip(-2), x)
    if x.shape[-1] == x.shape[-2]:
        x = torch.where((torch.rand(n, generator=gen) < 0.5).view(-1, 1, 1, 1).to(x.device), x.transpose(-1, -2), x)
    return x


def loader_workers(requested: int, data: SiteSplit, *, cuda: bool) -> int:
    """train.num-workers resolved: -1 (auto) gives image files on CUDA min(8, CPUs - 1) workers, else 0."""
    if requested >= 0:
        return requested
    if not cuda or isinstance(data, ArraySplit):  # arrays in memory, or a CPU that trains 37x slower than it loads
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def make_loader(
    data: SiteSplit, batch_size: int, *, seed: int | None, num_workers: int = 0, pin_memory: bool = False,
    indexed: bool = False,
) -> DataLoader:
    """Batches of (uint8 B x H x W x 3, labels, skipped[, indices kept when indexed]); shuffled from seed when given; pinned on CUDA."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    workers = loader_workers(num_workers, data, cuda=pin_memory)
    return DataLoader(
        IndexedSplit(data) if indexed else data, batch_size=batch_size, shuffle=seed is not None, generator=gen,
        num_workers=workers, pin_memory=pin_memory, collate_fn=collate_indexed if indexed else collate_skipping,
        persistent_workers=workers > 0,
    )


def train_local(
    model: nn.Module, data: SiteSplit, cfg: TrainConfig, device: torch.device, *, seed: int,
    proximal_mu: float = 0.0, grad_correction: Callable[[nn.Module], None] | None = None,
) -> TrainResult:
    """Train in place for cfg.local_epochs; returns the mean training loss.

    proximal_mu > 0 adds FedProx's term mu/2 * ||w - w_global||^2 (Li et al. 2020), w_global being
    the weights the model holds when called. grad_correction(model), when given, edits the (unscaled)
    gradients after every backward pass and before the optimizer step (SCAFFOLD's g - c_i + c).
    """
    if len(data) == 0:
        raise ValueError("cannot train on a site with zero training images")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    opt = OPTIMIZERS[cfg.optimizer](model.parameters(), cfg.lr, cfg.weight_decay, cfg.momentum)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp and not torch.cuda.is_bf16_supported())
    loader = make_loader(data, cfg.batch_size, seed=seed, num_workers=cfg.num_workers,
                         pin_memory=device.type == "cuda")
    schedule = SCHEDULES[cfg.lr_schedule](opt, cfg.local_epochs * len(loader))
    total, seen, skipped, steps, start = torch.zeros((), device=device), 0, 0, 0, time.perf_counter()
    for _ in range(cfg.local_epochs):
        for images, labels, lost in loader:
            skipped += lost
            if labels.numel() < 2:  # a lone sample breaks BatchNorm statistics
                continue
            x = augment(to_input(images, device, cfg.channels_last), gen)
            y = labels.to(device, non_blocking=True)
            with _autocast(device, cfg.amp):
                loss = F.cross_entropy(model(x), y)
            if anchor:
                loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if grad_correction is not None:
                scaler.unscale_(opt)  # the correction is in gradient units (a no-op without fp16 scaling)
                grad_correction(model)
            scaler.step(opt)
            steps += 1
            scaler.update()
            if schedule is not None:
                schedule.step()
            total += loss.detach().float() * labels.numel()  # stays on the device: no GPU sync per step
            seen += labels.numel()
    if seen == 0:
        raise ValueError(f"no readable training images on this site ({skipped} unreadable)")
    return TrainResult(loss=float(total) / seen, num_examples=len(data), seconds=time.perf_counter() - start,
                       skipped=skipped // cfg.local_epochs, steps=steps)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: SiteSplit, device: torch.device, *, batch_size: int = 128, amp: bool = True,
    num_workers: int = -1, channels_last: bool = True,
) -> EvalResult:
    """Loss, confusion counts and logit histograms on a split (unreadable images skipped, counted).

    With patient identifiers (data.patients) also the per-patient sums (patient_summary); no identifier
    leaves this function.
    """
    model.eval()
    num_classes = model.num_classes
    outputs, ys, kept, total, skipped = [], [], [], torch.zeros((), device=device), 0
    loader = make_loader(data, batch_size, seed=None, num_workers=num_workers, pin_memory=device.type == "cuda",
                         indexed=True)
    for images, labels, lost, index in loader:
        skipped += lost
        kept.append(index)
        if labels.numel() == 0:
            continue
        with _autocast(device, amp):
            logits = model(to_input(images, device, channels_last)).float()
        total += F.cross_entropy(logits, labels.to(device, non_blocking=True), reduction="sum")
        outputs.append(logits.cpu())  # the score summary needs logits: softmax saturates at 0/1
        ys.append(labels)
    read = torch.cat(kept).numpy() if kept else np.zeros(0, dtype=np.int64)  # images that were readable
    patients = data.patients[read] if data.patients is not None else None
    return eval_result(outputs, ys, float(total), skipped, num_classes, patients=patients)


def eval_result(logits: list[torch.Tensor], ys: list[torch.Tensor], loss_sum: float, skipped: int, num_classes: int,
                *, patients: np.ndarray | None = None) -> EvalResult:
    """An EvalResult from per-batch logits and labels (and the summed loss); `patients`: each item's patient id."""
    out = torch.cat(logits).numpy() if logits else np.zeros((0, num_classes))
    y = torch.cat(ys).numpy() if ys else np.zeros(0, dtype=np.int64)
    by_patient = {}
    if patients is not None:
        count, score_sum, hist = patient_summary(patients, out.argmax(axis=1) == y)
        by_patient = {"patients": count, "patient_score_sum": score_sum, "patient_hist": hist}
    return EvalResult(
        loss=loss_sum / max(len(y), 1),
        num_examples=len(y),
        confusion=confusion_matrix(y, out.argmax(axis=1), num_classes),
        histograms=score_histograms(y, out),
        skipped=skipped,
        **by_patient,
    )
