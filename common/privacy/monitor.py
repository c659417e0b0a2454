"""What travels and what is reported: privacy record keys, per-site ε per round, the budget policy and the privacy report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from common.privacy.accounting import CentralAccountant, CentralPlan, extend, plan_central

# MetricRecord keys a DP site adds to its train reply (numbers only)
EPSILON = "privacy-epsilon"
DELTA = "privacy-delta"
NOISE = "privacy-noise-multiplier"
SAMPLE_RATE = "privacy-sample-rate"
STEPS = "privacy-steps"
TOTAL_STEPS = "privacy-total-steps"
MAX_GRAD_NORM = "privacy-max-grad-norm"
BUDGET = "privacy-budget"
# ConfigRecord key (in the reply's site record): why the site declined to train
DECLINED = "privacy-declined"

if TYPE_CHECKING:
    from common.config import RunConfig
    from common.privacy.trainer import PrivateTrainResult

_FIELDS = {EPSILON: "epsilon", DELTA: "delta", NOISE: "noise-multiplier", SAMPLE_RATE: "sample-rate",
           STEPS: "steps", TOTAL_STEPS: "total-steps", MAX_GRAD_NORM: "max-grad-norm", BUDGET: "budget"}
NOT_COVERED = ("ε bounds what the model weights a site sends can reveal about one record; the training loss and "
               "the evaluation counts (confusion matrix, score histograms) each site also reports are not covered")


class PrivacyBudgetStop(RuntimeError):
    """The federation stops: a site's budget is spent and the policy says stop (or no site can train any more)."""


def encode_metrics(result: PrivateTrainResult) -> dict[str, float | int]:
    """A PrivateTrainResult as MetricRecord values."""
    plan = result.plan
    return {EPSILON: float(result.epsilon), DELTA: float(plan.delta), NOISE: float(plan.noise_multiplier),
            SAMPLE_RATE: float(plan.sample_rate), STEPS: int(result.steps), TOTAL_STEPS: int(result.total_steps),
            MAX_GRAD_NORM: float(plan.max_grad_norm), BUDGET: float(plan.budget)}


def decode_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The privacy fields of one site's reply ({} when the site did not run DP-SGD)."""
    if EPSILON not in metrics:
        return {}
    return {name: (int(metrics[key]) if name.endswith("steps") else float(metrics[key]))
            for key, name in _FIELDS.items() if key in metrics}


class PrivacyMonitor:
    """Server-side privacy bookkeeping for one run: ε per site and round, budget policy, the privacy report."""

    def __init__(self, cfg: RunConfig, central: CentralPlan | None = None) -> None:
        self.cfg = cfg
        self.spec = cfg.privacy.spec
        if central is None and self.spec.central:
            central = plan_central(cfg)
        self.central = CentralAccountant(central) if central is not None else None
        self.sites: dict[str, dict[str, Any]] = {}
        self.stopped = ""
        self._round: dict[str, dict[str, Any]] = {}

    def trained(self, metrics_by_site: Mapping[str, Mapping[str, Any]], *, clipping_norm: float | None = None) -> None:
        """Train replies of a round: local ε as reported by each site, or central ε accounted here (at the wrapper's norm)."""
        if self.central is not None:
            examples = {site: int(m.get("num-examples", 0)) for site, m in metrics_by_site.items()}
            entries = self.central.record(examples)
            norm = self.cfg.privacy.clipping_norm if clipping_norm is None else clipping_norm
            for site, entry in entries.items():
                entry["clipping-norm"] = float(norm)
            self._round.update(entries)
            return
        for site, metrics in metrics_by_site.items():
            entry = decode_metrics(metrics)
            if entry:
                self._round[site] = entry

    def declined(self, server_round: int, declined: Mapping[str, tuple[Mapping[str, Any], str]], remaining: int) -> None:
        """Sites that declined to train (budget spent): record them, then apply privacy.on-budget-exhausted."""
        for site, (metrics, reason) in declined.items():
            self._round[site] = {**decode_metrics(metrics), "declined": reason}
        reasons = "; ".join(reason for _, reason in declined.values())
        if self.cfg.privacy.on_budget_exhausted == "stop":
            self.stop(f"round {server_round}: {reasons} (privacy.on-budget-exhausted=stop)")
        if remaining == 0:
            self.stop(f"round {server_round}: no site can train within its privacy budget any more: {reasons}")

    def stop(self, reason: str) -> None:
        """Record why the federation stops and raise PrivacyBudgetStop."""
        self.stopped = reason
        raise PrivacyBudgetStop(reason)

    def end_round(self, server_round: int) -> dict[str, dict[str, Any]]:
        """This round's per-site entries (for the round's metrics line), added to the report."""
        entries, self._round = self._round, {}
        for site, entry in entries.items():
            row = self.sites.setdefault(site, {"rounds": []})
            row["rounds"].append({"round": server_round, **entry})
            row.update({k: v for k, v in entry.items() if k not in ("declined", "weight")})
        return entries

    def check_next_round(self, server_round: int) -> None:
        """Central DP: stop before a round that would exceed the budget (local sites decline on their own)."""
        if self.central is not None and server_round < self.cfg.federation.rounds:
            reason = self.central.next_round_exceeds()
            if reason:
                self.stop(f"after round {server_round}: {reason}")

    def restore(self, report: Mapping[str, Any]) -> None:
        """Resume: continue the interrupted run's report (central DP: and its accountant histories, round by round)."""
        self.sites = {site: dict(row) for site, row in report.get("sites", {}).items()}
        if self.central is None:
            return  # local DP: each site's ledger on disk already holds its history
        for site, row in self.sites.items():
            for entry in row.get("rounds", []):
                if "declined" not in entry and "noise-multiplier" in entry:
                    noise = float(entry["noise-multiplier"])
                    self.central.histories[site] = extend(self.central.histories.get(site, []), noise, 1.0, 1)
                    self.central._last[site] = noise

    def report(self) -> dict[str, Any]:
        """The privacy report (RunDirectory.PRIVACY): per site ε(δ) after each round and every setting that produced it."""
        p = self.cfg.privacy
        body: dict[str, Any] = {
            "mode": self.spec.name, "accountant": p.accountant, "budget-epsilon": p.target_epsilon,
            "on-budget-exhausted": p.on_budget_exhausted, "stopped": self.stopped or None, "not-covered": NOT_COVERED,
        }
        if self.central is not None:
            plan = self.central.plan
            body.update(mechanism=self.spec.mechanism, unit="one hospital (all its records)",
                        **{"noise-multiplier": plan.noise_multiplier, "initial-clipping-norm": plan.clipping_norm,
                           "sites-per-round": plan.num_sampled, "delta": plan.delta, "sample-rate": 1.0,
                           "planned-rounds": plan.rounds})
            if self.spec.adaptive:
                body.update({"target-clipped-quantile": p.target_clipped_quantile, "clip-norm-lr": p.clip_norm_lr})
        else:
            body.update(mechanism=self.spec.mechanism, unit="one training image", **{
                "poisson-sampling": p.poisson_sampling, "noise-multiplier-setting": p.noise_multiplier,
                "fast-depthwise": p.fast_depthwise})
        body["sites"] = self.sites
        return body
