"""Local DP-SGD for one site and one round: budget check against the ledger, Opacus PrivacyEngine, ledger update."""

from __future__ import annotations

import secrets
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from common.config import RunConfig
from common.datasets.splits import SiteSplit
from common.finetune import site_batches, run_epochs, trainable_optimizer
from common.privacy.accounting import History, LocalPlan, epsilon, extend, plan_local
from common.privacy.ledger import PrivacyLedger
from common.trainable import make_split
from common.training import TrainResult


@dataclass(frozen=True)
class PrivateTrainResult:
    """One site's DP-SGD round, or why it declined (then `train` is None and `declined` says why)."""

    plan: LocalPlan
    epsilon: float  # spent after this round (or so far, when the site declined)
    steps: int  # DP-SGD steps this round
    total_steps: int  # steps in the site's whole ledger
    rounds: int  # rounds in the site's ledger
    train: TrainResult | None = None
    declined: str = ""


def _noise_only_step(optimizer: torch.optim.Optimizer) -> None:
    """An empty Poisson batch still takes a step: zero clipped gradients plus noise (and the accountant counts it)."""
    for p in optimizer.params:  # type: ignore[attr-defined]
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


def dp_input(x: torch.Tensor) -> torch.Tensor:
    """DP-SGD input in NCHW: Opacus 1.6's own Conv2d sampler returns wrong per-sample gradients for channels_last
    activations (measured: relative error > 1), which would void the clipping; histofed's fast sampler is exact in both."""
    return x.contiguous()


def _empty_batch_template(loader: DataLoader) -> None:
    """Give Opacus's Poisson loader the structure of an empty batch (it cannot build one from numpy dtypes)."""
    template = getattr(loader, "collate_fn", None)
    if hasattr(template, "first_batch"):
        template.first_batch = (torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64),
                                torch.zeros(1, dtype=torch.int64))


def _secret_generator() -> torch.Generator:
    """Noise and Poisson sampling must be unpredictable: never seeded from the public train.seed."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def dp_sgd(
    model: nn.Module, data: SiteSplit, cfg: RunConfig, device: torch.device, plan: LocalPlan, history: History,
    *, seed: int, site: str = "site",
) -> tuple[TrainResult, History]:
    """Train in place with Opacus (hooks on the unwrapped model, keys unchanged); returns the result and new history.

    The fine-tuning loop (common.finetune) runs under Opacus: only the trainable tail is hooked, the frozen
    prefix runs without autograd (or comes from the feature cache), each image's gradient is the mean over
    its K views before clipping, and train.batch-size is the logical (Poisson) batch, split into physical
    batches of privacy.physical-batch-size images by Opacus's BatchMemoryManager.
    """
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    from common.privacy import grad_sampler  # noqa: F401 - registers the fast grouped-conv sampler

    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # documented: noise from OS-seeded torch RNG
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # the stem's input needs no grad
    engine = PrivacyEngine(accountant=plan.accountant)
    engine.accountant.history = list(history)  # restored: the new engine continues where the ledger stands
    split = make_split(model, cfg.model.trainable, cfg.model.image_size)
    if not (split.cacheable and cfg.privacy.fast_depthwise):  # hooked convs see NCHW (dp_input); a frozen prefix may not
        model.to(memory_format=torch.contiguous_format)
    model.train()
    start = time.perf_counter()
    batches = site_batches(model, split, data, cfg, device, site=site, aug=torch.Generator().manual_seed(seed),
                           shuffle=_secret_generator(), private=True)
    hooks, dp_opt, dp_loader = engine.make_private(
        module=model, optimizer=trainable_optimizer(model, cfg), data_loader=batches.loader,
        noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
        poisson_sampling=cfg.privacy.poisson_sampling, noise_generator=_secret_generator(), wrap_model=False,
    )
    _empty_batch_template(dp_loader)
    physical = cfg.privacy.physical_batch_size
    try:
        if physical and physical < cfg.train.batch_size:
            with BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=physical, optimizer=dp_opt) as small:
                _empty_batch_template(small)
                batches.loader = small
                total, seen = run_epochs(model, split, batches, dp_opt, cfg, dp=True,
                                         empty_step=lambda: _noise_only_step(dp_opt))
        else:
            batches.loader = dp_loader
            total, seen = run_epochs(model, split, batches, dp_opt, cfg, dp=True,
                                     empty_step=lambda: _noise_only_step(dp_opt))
    finally:
        dp_opt.zero_grad(set_to_none=True)
        hooks.cleanup()  # the model object is reused next round (and by evaluate) without hooks
    skipped = batches.skipped if batches.cached else batches.skipped // cfg.train.local_epochs
    result = TrainResult(loss=total / seen if seen else 0.0, num_examples=len(data),
                         seconds=time.perf_counter() - start, skipped=skipped)
    return result, [tuple(h) for h in engine.accountant.history]  # type: ignore[misc]


def train_private(
    model: nn.Module, data: SiteSplit, cfg: RunConfig, device: torch.device, *, seed: int, site: str,
    ledger_file: Path, server_round: int = 0, run_id: int | str = "",
) -> PrivateTrainResult:
    """Check the site's budget, train one round with DP-SGD and record it in the ledger (write-ahead)."""
    if len(data) == 0:
        raise ValueError("cannot train on a site with zero training images")
    plan = plan_local(cfg, len(data))
    ledger = PrivacyLedger.open(ledger_file, site=site)
    spent = epsilon(ledger.history, delta=plan.delta, accountant=plan.accountant)
    planned = extend(ledger.history, plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
    after = epsilon(planned, delta=plan.delta, accountant=plan.accountant)
    done = sum(1 for r in ledger.rounds if r.get("status") == "done")
    if after > plan.budget * (1 + 1e-9):
        reason = (f"site {site} declines round {server_round}: privacy budget exhausted (ε = {spent:.3f} spent "
                  f"over {done} rounds; one more round would reach ε = {after:.3f} > budget {plan.budget:g} "
                  f"at δ = {plan.delta:g}; ledger {ledger_file})")
        return PrivateTrainResult(plan, spent, 0, ledger.steps, done, declined=reason)
    before = list(ledger.history)
    ledger.history = planned  # write-ahead: a crash mid-round leaves the planned steps counted
    ledger.rounds.append({"run": str(run_id), "round": server_round, "status": "training",
                          "noise-multiplier": plan.noise_multiplier, "sample-rate": plan.sample_rate,
                          "max-grad-norm": plan.max_grad_norm, "steps": plan.steps_per_round,
                          "delta": plan.delta, "accountant": plan.accountant, "epsilon": after})
    ledger.save()
    result, history = dp_sgd(model, data, cfg, device, plan, before, seed=seed, site=site)
    ledger.history = history
    spent = epsilon(history, delta=plan.delta, accountant=plan.accountant)
    steps = sum(n for _, _, n in history) - sum(n for _, _, n in before)
    ledger.rounds[-1].update(status="done", steps=steps, epsilon=spent)
    ledger.save()
    return PrivateTrainResult(plan, spent, steps, ledger.steps, done + 1, train=result)
