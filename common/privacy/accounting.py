"""Privacy accounting: δ below 1/N, σ from a target ε over the planned rounds, ε of an accountant history (Opacus RDP/PRV)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from typing import TYPE_CHECKING

from common.errors import ConfigError

if TYPE_CHECKING:
    from common.config import RunConfig

SIGMA_MAX = 50.0  # a target that needs more noise than this is unreachable in practice (the noise drowns the signal)
MEAN_STRATEGIES = ("fedavg", "fedprox")  # aggregate = (weighted) mean of the updates: Flower's DP wrappers fit them
History = list[tuple[float, float, int]]  # Opacus accountant history: (noise multiplier, sample rate, steps)


def epsilon(history: Sequence[Sequence[float]], *, delta: float, accountant: str) -> float:
    """ε at δ of a history, computed by a fresh Opacus accountant (0 for an empty history)."""
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def extend(history: Sequence[Sequence[float]], noise: float, rate: float, steps: int) -> History:
    """The history with `steps` more steps at (noise, rate), merged like Opacus's accountants merge them."""
    out: History = [(float(s), float(q), int(n)) for s, q, n in history]
    if steps <= 0:
        return out
    if out and out[-1][0] == noise and out[-1][1] == rate:
        out[-1] = (noise, rate, out[-1][2] + steps)
    else:
        out.append((float(noise), float(rate), int(steps)))
    return out


def default_delta(num_records: int) -> float:
    """δ = min(1e-5, 0.1 / N): always an order of magnitude below 1/N."""
    return min(1e-5, 0.1 / max(num_records, 1))


def resolve_delta(delta: float, num_records: int, *, unit: str) -> float:
    """The configured δ (0 = default), refused unless it is below 1/N."""
    if num_records <= 0:
        raise ConfigError(f"differential privacy needs at least one record ({unit}: 0)")
    if delta == 0.0:
        return default_delta(num_records)
    if delta >= 1.0 / num_records:
        raise ConfigError(
            f"invalid value for 'privacy.delta': δ must be below 1/N = 1/{num_records} ({unit}); a δ this large "
            f"allows publishing a whole record (got {delta:g})"
        )
    return delta


@functools.lru_cache(maxsize=64)
def calibrate(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest σ (within Opacus's 0.01 ε tolerance) whose ε after `steps` stays at or below the target."""
    from opacus.accountants.utils import get_noise_multiplier

    floor = epsilon([(SIGMA_MAX, sample_rate, steps)], delta=delta, accountant=accountant)
    if floor > target_epsilon:
        raise ConfigError(
            f"invalid value for 'privacy.target-epsilon': ε = {target_epsilon:g} at δ = {delta:g} is unreachable "
            f"over {steps} steps at sampling rate {sample_rate:.4g} (even σ = {SIGMA_MAX:g} spends ε = {floor:.3g}); "
            f"raise the target or plan fewer rounds/epochs (got {target_epsilon:g})"
        )
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant))


@dataclass(frozen=True)
class LocalPlan:
    """One site's DP-SGD settings for this run, fixed before its first step."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    delta: float
    budget: float
    max_grad_norm: float
    accountant: str
    num_examples: int


def plan_local(cfg: RunConfig, num_examples: int) -> LocalPlan:
    """σ, q, steps per round and δ for a site with `num_examples` training images; ConfigError on a bad choice."""
    p = cfg.privacy
    delta = resolve_delta(p.delta, num_examples, unit="training images at this site")
    batches = math.ceil(num_examples / cfg.train.batch_size)
    rate = 1.0 / batches
    steps = cfg.train.local_epochs * int(1 / rate)  # what Opacus's Poisson sampler yields per epoch
    if p.noise_multiplier == "auto":
        noise = calibrate(target_epsilon=p.target_epsilon, delta=delta, sample_rate=rate,
                          steps=steps * cfg.federation.rounds, accountant=p.accountant)
    else:
        noise = float(p.noise_multiplier)
        one_round = epsilon([(noise, rate, steps)], delta=delta, accountant=p.accountant)
        if one_round > p.target_epsilon:
            raise ConfigError(
                f"invalid value for 'privacy.noise-multiplier': σ = {noise:g} spends ε = {one_round:.3g} in one "
                f"round, more than privacy.target-epsilon = {p.target_epsilon:g}; raise σ or use 'auto' (got {noise:g})"
            )
    return LocalPlan(noise, rate, steps, delta, p.target_epsilon, p.max_grad_norm, p.accountant, num_examples)


@dataclass(frozen=True)
class CentralPlan:
    """Central DP settings: Gaussian noise on the aggregate of m clipped site updates per round."""

    mode: str
    noise_multiplier: float
    clipping_norm: float
    num_sampled: int
    delta: float
    budget: float
    accountant: str
    rounds: int


def plan_central(cfg: RunConfig) -> CentralPlan:
    """σ (calibrated with q = 1, no amplification assumed), sites per round and δ (below 1 / number of sites)."""
    p, fed = cfg.privacy, cfg.federation
    if fed.strategy not in MEAN_STRATEGIES:
        raise ConfigError(
            f"invalid value for 'federation.strategy': central DP (privacy.mode={p.mode}) calibrates its noise to a "
            f"mean of clipped updates; use {' or '.join(MEAN_STRATEGIES)} (got '{fed.strategy}')"
        )
    sites = len(fed.training_sites)
    sampled = min(sites, max(int(sites * fed.fraction_train), fed.min_train_sites))
    delta = resolve_delta(p.delta, sites, unit="sites: central DP protects a whole hospital")
    if p.noise_multiplier == "auto":
        noise = calibrate(target_epsilon=p.target_epsilon, delta=delta, sample_rate=1.0, steps=fed.rounds,
                          accountant=p.accountant)
    else:
        noise = float(p.noise_multiplier)
    return CentralPlan(p.mode, noise, p.clipping_norm, sampled, delta, p.target_epsilon, p.accountant, fed.rounds)


class CentralAccountant:
    """Per-site ε of central DP, round by round (server memory: one ServerApp process runs the whole run).

    Flower's wrappers add noise of std σ·C/m to the FedAvg aggregate of m clipped updates. With example
    weights w_i (Σ w = 1), site i's update moves the aggregate by at most w_i·C, so its effective noise
    multiplier is σ / (m·w_i): σ itself for equal sites, less for a site bigger than average.
    """

    def __init__(self, plan: CentralPlan) -> None:
        self.plan = plan
        self.histories: dict[str, History] = {}
        self._last: dict[str, float] = {}

    def record(self, examples: dict[str, int]) -> dict[str, dict[str, float | int | str]]:
        """Account one released aggregate over the sites that took part; returns each site's entry."""
        total, sampled = float(sum(examples.values())), len(examples)
        out: dict[str, dict[str, float | int | str]] = {}
        for site, n in sorted(examples.items()):
            weight = n / total if total > 0 else 1.0 / sampled
            noise = self.plan.noise_multiplier / (sampled * weight)
            self.histories[site] = extend(self.histories.get(site, []), noise, 1.0, 1)
            self._last[site] = noise
            out[site] = {
                "epsilon": epsilon(self.histories[site], delta=self.plan.delta, accountant=self.plan.accountant),
                "delta": self.plan.delta, "noise-multiplier": noise, "sample-rate": 1.0,
                "steps": sum(s for _, _, s in self.histories[site]), "weight": weight,
            }
        return out

    def next_round_exceeds(self) -> str:
        """Why one more round would exceed the budget for some site ('' when it would not)."""
        for site, history in sorted(self.histories.items()):
            spent = epsilon(history, delta=self.plan.delta, accountant=self.plan.accountant)
            after = epsilon(extend(history, self._last[site], 1.0, 1), delta=self.plan.delta,
                            accountant=self.plan.accountant)
            if after > self.plan.budget * (1 + 1e-9):
                return (f"central DP budget exhausted: site {site} has spent ε = {spent:.3f}; one more round would "
                        f"reach ε = {after:.3f} > privacy.target-epsilon = {self.plan.budget:g} (δ = {self.plan.delta:g})")
        return ""
