"""The fine-tuning loop at a site (model.trainable other than all, and every DP-SGD round): frozen prefix, cached or live
features, augmentation multiplicity, weight averaging; DP-SGD (common/privacy/trainer.py) runs the same loop under Opacus.

One step: a batch of images (or of cached-feature indices) → K views per image (flips/rotations; cached:
K distinct views of the 8) → the frozen prefix without autograd (or its cached output) → the trainable tail →
cross-entropy averaged over the K·B rows. Under DP each image's gradient is the mean of its K views'
gradients, clipped once (augmentation multiplicity, De et al. 2022), so the privacy unit stays one image.
With `train.ema-decay` the site sends an exponential moving average of its trainable weights (a function
of the iterates only: free under DP). The plain run of a recipe is this loop without clipping and noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import RunConfig
from common.datasets.index_cache import default_cache_dir
from common.datasets.splits import SiteSplit, collate_skipping
from common.feature_cache import VIEWS, FeatureSet, cached_features
from common.metrics import EvalResult
from common.trainable import Split, make_split, trainable_names, update_keys
from common.training import OPTIMIZERS, TrainResult, augment, eval_result, evaluate, loader_workers, to_input

Rows = Callable[[Any], tuple[torch.Tensor, torch.Tensor, int]]  # a loader batch → (tail inputs K·B x ..., labels B, skipped)


def uses_finetune_loop(cfg: RunConfig) -> bool:
    """Whether a site trains through this loop: every fine-tuning part, and DP-SGD with any part."""
    return cfg.model.trainable != "all" or cfg.privacy.spec.local


def cache_enabled(cfg: RunConfig, split: Split) -> bool:
    """Frozen-prefix features are cached when the prefix is frozen and no augmentation needs the pixels."""
    return split.cacheable and cfg.train.feature_cache == "auto" and cfg.data.stain_augment == 0


def collate_counted(batch: list[tuple[np.ndarray | None, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """collate_skipping with the skipped count as a tensor (Opacus builds empty Poisson batches from tensors only)."""
    images, labels, skipped = collate_skipping(batch)
    return images, labels, torch.tensor([skipped])


@dataclass
class SiteBatches:
    """A site's training data as the loop sees it: a DataLoader and how one of its batches becomes tail inputs."""

    loader: DataLoader
    rows: Rows
    cached: bool
    skipped: int = 0  # unreadable images (cached: counted once when the features were computed)


def site_batches(model: nn.Module, split: Split, data: SiteSplit, cfg: RunConfig, device: torch.device, *,
                 site: str, aug: torch.Generator, shuffle: torch.Generator, private: bool) -> SiteBatches:
    """The loader and row builder for this site: cached prefix features when possible, else images through the prefix."""
    k, batch = cfg.train.augment_multiplicity, cfg.train.batch_size
    if cache_enabled(cfg, split):
        feats = site_features(model, split, data, cfg, device, site=site, split_name="train", views=VIEWS)
        loader = DataLoader(TensorDataset(torch.arange(len(feats)), feats.labels), batch_size=batch, shuffle=True,
                            generator=shuffle)
        return SiteBatches(loader, _cached_rows(feats, k, aug, device), True, feats.skipped)
    channels_last = cfg.train.channels_last and not (private and not split.cacheable)  # DP hooks need NCHW (trainer.dp_input)
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=shuffle, collate_fn=collate_counted,
                        num_workers=loader_workers(cfg.train.num_workers, data, cuda=device.type == "cuda"))

    def rows(item: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        images, labels = item[0], item[1]
        lost = int(item[2].sum()) if len(item) > 2 else 0
        if labels.numel() == 0:
            return images, labels, lost
        x = augment(to_input(images, device, channels_last).repeat_interleave(k, dim=0), aug)
        if split.cacheable:
            with torch.no_grad():
                x = split.prefix(x)
        elif not channels_last:
            x = x.contiguous()
        return x, labels.to(device), lost

    return SiteBatches(loader, rows, False)


def _cached_rows(feats: FeatureSet, k: int, aug: torch.Generator, device: torch.device) -> Rows:
    """Rows from cached features: for each index, K distinct views drawn at random among the cached ones."""
    k = min(k, feats.views)

    def rows(item: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        idx, labels = item[0], item[1]
        if labels.numel() == 0:
            return idx, labels, 0
        views = torch.rand(len(idx), feats.views, generator=aug).argsort(dim=1)[:, :k]  # B x K distinct views
        x = feats.features[views, idx.view(-1, 1)].reshape(len(idx) * k, -1)
        return x.to(device, torch.float32), labels.to(device), 0

    return rows


def site_features(model: nn.Module, split: Split, data: SiteSplit, cfg: RunConfig, device: torch.device, *, site: str,
                  split_name: str, views: int) -> FeatureSet:
    """The site's cached prefix features of one split (computed on the first call for these frozen weights)."""
    return cached_features(model, split, data, views=views, device=device, cache_dir=default_cache_dir(cfg.data.cache_dir),
                           name=f"{site}-{split_name}", trainable=update_keys(model, split.part),
                           channels_last=cfg.train.channels_last)


class WeightAverage:
    """Exponential moving average of parameters with warm-up: decay_t = min(decay, (1 + t) / (10 + t))."""

    def __init__(self, params: Iterable[nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.decay = decay
        self.steps = 0
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights into the average (after an optimizer step)."""
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach(), alpha=1 - d)

    @torch.no_grad()
    def apply(self) -> None:
        """Write the average into the parameters."""
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def average_view_gradients(params: Iterable[nn.Parameter], k: int) -> None:
    """Per-sample gradients of K·B rows → B per-image gradients, the mean over each image's K views (before clipping)."""
    for p in params:
        gs = p.grad_sample
        if isinstance(gs, list):  # accumulated over several backward passes: not produced by this loop
            raise RuntimeError("augmentation multiplicity needs one backward pass per optimizer step")
        p.grad_sample = gs.view(-1, k, *gs.shape[1:]).mean(dim=1)


def train_step(split: Split, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               params: list[nn.Parameter], *, k: int, dp: bool, penalty: Callable[[], torch.Tensor] | None = None) -> float:
    """One step on K·B rows (gradients zeroed by the caller): tail, mean cross-entropy, per-image view average (DP), step."""
    loss = F.cross_entropy(split.tail(x), y.repeat_interleave(k))
    value = float(loss.detach())
    if penalty is not None:
        loss = loss + penalty()
    loss.backward()
    if dp and k > 1:
        average_view_gradients(params, k)
    optimizer.step()
    return value


def run_epochs(model: nn.Module, split: Split, batches: SiteBatches, optimizer: torch.optim.Optimizer,
               cfg: RunConfig, *, dp: bool, empty_step: Callable[[], None] | None = None,
               proximal_mu: float = 0.0) -> tuple[float, int]:
    """The local epochs (DP: `optimizer` is Opacus's); returns (summed loss, images seen). EMA applied at the end."""
    params = [p for p in model.parameters() if p.requires_grad]
    k = min(cfg.train.augment_multiplicity, VIEWS)
    ema = WeightAverage(params, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 and not dp else []  # FedProx (not under DP)

    def penalty() -> torch.Tensor:
        return proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))

    total, seen = 0.0, 0
    model.train()
    for _ in range(cfg.train.local_epochs):
        for item in batches.loader:
            x, y, lost = batches.rows(item)
            batches.skipped += lost
            optimizer.zero_grad(set_to_none=True)
            if y.numel() == 0:
                if empty_step is not None:  # DP: an empty Poisson batch is still a (noise-only) step
                    empty_step()
                continue
            loss = train_step(split, x, y, optimizer, params, k=k, dp=dp, penalty=penalty if anchor else None)
            if ema is not None and not getattr(optimizer, "_is_last_step_skipped", False):
                ema.update()
            total += loss * y.numel()
            seen += y.numel()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.apply()
    return total, seen


def trainable_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable parameters only."""
    return OPTIMIZERS[cfg.train.optimizer]([p for p in model.parameters() if p.requires_grad], cfg.train.lr,
                                           cfg.train.weight_decay, cfg.train.momentum)


def train_finetune(model: nn.Module, data: SiteSplit, cfg: RunConfig, device: torch.device, *, seed: int, site: str,
                   proximal_mu: float = 0.0) -> TrainResult:
    """One non-private round of the fine-tuning recipe (the DP recipe without clipping and noise)."""
    if len(data) == 0:
        raise ValueError("cannot train on a site with zero training images")
    if not trainable_names(model):
        raise ValueError("model.trainable leaves nothing to train")
    torch.manual_seed(seed)
    start = time.perf_counter()
    split = make_split(model, cfg.model.trainable, cfg.model.image_size)
    batches = site_batches(model, split, data, cfg, device, site=site, aug=torch.Generator().manual_seed(seed),
                           shuffle=torch.Generator().manual_seed(seed + 1), private=False)
    total, seen = run_epochs(model, split, batches, trainable_optimizer(model, cfg), cfg, dp=False,
                             proximal_mu=proximal_mu)
    if seen == 0:
        raise ValueError(f"no readable training images on this site ({batches.skipped} unreadable)")
    skipped = batches.skipped if batches.cached else batches.skipped // cfg.train.local_epochs
    return TrainResult(loss=total / seen, num_examples=len(data), seconds=time.perf_counter() - start, skipped=skipped)


@torch.no_grad()
def evaluate_site(model: nn.Module, data: SiteSplit, cfg: RunConfig, device: torch.device, *, site: str) -> EvalResult:
    """Evaluation on a split: through cached prefix features when the recipe caches them, else on the pixels."""
    split = make_split(model, cfg.model.trainable, cfg.model.image_size) if cfg.model.trainable != "all" else None
    if split is None or not cache_enabled(cfg, split):
        return evaluate(model, data, device, amp=cfg.train.amp, num_workers=cfg.train.num_workers,
                        channels_last=cfg.train.channels_last)
    feats = site_features(model, split, data, cfg, device, site=site, split_name="test", views=1)
    model.eval()
    outputs, ys, total = [], [], 0.0
    for start in range(0, len(feats), 256):
        x = feats.features[0, start:start + 256].to(device, torch.float32)
        y = feats.labels[start:start + 256]
        logits = split.tail(x).float().cpu()
        total += float(F.cross_entropy(logits, y, reduction="sum"))
        outputs.append(logits)
        ys.append(y)
    patients = data.patients[feats.index.numpy()] if data.patients is not None and feats.index is not None else None
    return eval_result(outputs, ys, total, feats.skipped, model.num_classes, patients=patients)
