"""Per-round bookkeeping: pooled global metrics from site counts, per-site metrics, one JSON line a round."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from common import protocol as P
from common.metrics import EvalResult, pooled_report, pooled_scores
from common.rundir import RunDirectory
from server.sites import SiteRegistry


def site_name(record: RecordDict, fallback: int) -> str:
    """The site a reply comes from (as it names itself), or node-<i> when it does not say."""
    site = record.config_records.get(P.SITE)
    return str(site[P.SITE_NAME]) if site and P.SITE_NAME in site else f"node-{fallback}"


def _metrics(record: RecordDict) -> MetricRecord:
    return next(iter(record.metric_records.values()))


def decode_replies(records: list[RecordDict], num_classes: int, prefix: str = "") -> dict[str, EvalResult]:
    """Each site's evaluation counts (and patient sums, when it sent them) from its reply, keys under prefix."""
    return {site_name(record, i): P.decode_eval(dict(_metrics(record)), num_classes, prefix)
            for i, record in enumerate(records) if prefix + P.CONFUSION in _metrics(record)}


def pool_replies(records: list[RecordDict], num_classes: int) -> dict[str, Any]:
    """Decode each site's counts from its evaluation reply and pool them (common.metrics.pooled_report).

    Sites with their own normalisation layers (FedBN) also report their personalised model: pooled the
    same way under "personalised" ({"global", "sites", "confusion"}), beside the global model's.
    """
    return _report(decode_replies(records, num_classes), decode_replies(records, num_classes, P.PERSONALISED))


def _report(per_site: dict[str, EvalResult], personal: dict[str, EvalResult]) -> dict[str, Any]:
    report = pooled_report(per_site)
    if personal:
        report["personalised"] = pooled_report(personal)
    return report


class RoundRecorder:
    """Collects a round's train and evaluate aggregates (Flower's metric-aggregation hooks) and writes its line."""

    def __init__(self, run: RunDirectory, num_classes: int, sites: SiteRegistry | None = None) -> None:
        self.run = run
        self.num_classes = num_classes
        self.sites = sites if sites is not None else SiteRegistry(num_classes=num_classes)  # failed/rejected per round
        self.history: list[dict[str, Any]] = []
        self.train_metrics: dict[str, dict[str, Any]] = {}  # this round's raw train metrics per site
        self._train: dict[str, Any] = {}
        self._eval: dict[str, Any] = {}
        self._scores: dict[str, Any] = {}

    def aggregate_train(self, records: list[RecordDict], weighting_key: str) -> MetricRecord:
        """Flower train_metrics_aggr_fn: keep per-site loss/time, return the weighted mean."""
        self.train_metrics = {site_name(r, i): dict(_metrics(r)) for i, r in enumerate(records)}
        self._train = {
            site: {"loss": float(m[P.TRAIN_LOSS]), "seconds": float(m[P.TRAIN_SECONDS]),
                   "examples": int(m[P.NUM_EXAMPLES]), "skipped-images": int(m.get(P.SKIPPED, 0))}
            for site, m in self.train_metrics.items()
        }
        merged = aggregate_metricrecords(records, weighting_key)
        return MetricRecord({k: v for k, v in merged.items() if not k.startswith("privacy-")})  # ε is per site

    def aggregate_evaluate(self, records: list[RecordDict], weighting_key: str) -> MetricRecord:
        """Flower evaluate_metrics_aggr_fn: pooled confusion counts → global metrics."""
        per_site = decode_replies(records, self.num_classes)
        self._eval = _report(per_site, decode_replies(records, self.num_classes, P.PERSONALISED))
        self._scores = pooled_scores(per_site)
        kinds = {str(r.config_records.get(P.SITE, {}).get(P.DATA_KIND, "")) for r in records}
        if "synthetic" in kinds:  # a site on generated data: say so even if the server cannot see its data
            self.run.mark_synthetic()
        return _finite(self._eval["global"])

    def end_round(self, server_round: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """Write the round's line (pooled and per-site metrics, train results, extra); None when nothing was evaluated."""
        if not self._eval:
            self._train, self.train_metrics = {}, {}
            return None
        record = {"round": server_round, **self._eval, "train": self._train, **self.sites.end_round(server_round),
                  **(extra or {})}
        self.run.write_declared_partition(self.sites.declarations())  # deployment: the only partition the server knows
        self.run.log_round(record)
        self.run.write_scores(server_round, self._scores)  # the latest round's score histograms (ROC in the report)
        self.history.append(record)
        self._train, self._eval, self._scores, self.train_metrics = {}, {}, {}, {}
        return record


def _finite(metrics: dict[str, float]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in metrics.items() if np.isfinite(v)})
