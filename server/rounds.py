"""Per-round bookkeeping: pooled global metrics from site counts, per-site metrics, one JSON line a round."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from common import protocol as P
from common.metrics import pooled_report as pool
from common.privacy import PrivacyMonitor
from common.training import EvalResult
from server.rundir import RunDirectory
from server.sites import SiteRegistry


def _site_name(record: RecordDict, fallback: int) -> str:
    site = record.config_records.get(P.SITE)
    return str(site[P.SITE_NAME]) if site and P.SITE_NAME in site else f"node-{fallback}"


def _metrics(record: RecordDict) -> MetricRecord:
    return next(iter(record.metric_records.values()))


def pooled_report(records: list[RecordDict], num_classes: int) -> dict[str, Any]:
    """Decode each site's counts from its reply and pool them (common.metrics.pooled_report)."""
    per_site = {}
    for i, record in enumerate(records):
        m = _metrics(record)
        cm, hist = P.decode_counts(dict(m), num_classes)
        per_site[_site_name(record, i)] = EvalResult(
            loss=float(m[P.EVAL_LOSS]), num_examples=int(m[P.NUM_EXAMPLES]), confusion=cm, histograms=hist,
            skipped=int(m.get(P.SKIPPED, 0)),
        )
    return pool(per_site)


class RoundRecorder:
    """Collects train/evaluate aggregates of a round and writes them when the round ends."""

    def __init__(self, run: RunDirectory, num_classes: int, sites: SiteRegistry | None = None) -> None:
        self.run = run
        self.num_classes = num_classes
        self.sites = sites if sites is not None else SiteRegistry(num_classes=num_classes)  # failed/rejected per round
        self.history: list[dict[str, Any]] = []
        self._train: dict[str, Any] = {}
        self._eval: dict[str, Any] = {}
        self.privacy: PrivacyMonitor | None = None  # set by the ServerApp when privacy.mode is not off
        self.last_arrays: ArrayRecord | None = None
        self.offset = 0  # rounds completed before a resume: Flower restarts its numbering at 1

    def aggregate_train(self, records: list[RecordDict], weighting_key: str) -> MetricRecord:
        """Flower train_metrics_aggr_fn: keep per-site loss/time, return the weighted mean."""
        self._train = {
            _site_name(r, i): {"loss": float(_metrics(r)[P.TRAIN_LOSS]),
                               "seconds": float(_metrics(r)[P.TRAIN_SECONDS]),
                               "examples": int(_metrics(r)[P.NUM_EXAMPLES]),
                               "skipped-images": int(_metrics(r).get(P.SKIPPED, 0))}
            for i, r in enumerate(records)
        }
        if self.privacy is not None:  # per-site ε: reported by DP-SGD sites, or accounted here for central DP
            self.privacy.trained({_site_name(r, i): dict(_metrics(r)) for i, r in enumerate(records)})
        merged = aggregate_metricrecords(records, weighting_key)
        return MetricRecord({k: v for k, v in merged.items() if not k.startswith("privacy-")})  # ε is per site

    def aggregate_evaluate(self, records: list[RecordDict], weighting_key: str) -> MetricRecord:
        """Flower evaluate_metrics_aggr_fn: pooled confusion counts → global metrics."""
        self._eval = pooled_report(records, self.num_classes)
        kinds = {str(r.config_records.get(P.SITE, {}).get(P.DATA_KIND, "")) for r in records}
        if "synthetic" in kinds:  # a site on generated data: say so even if the server cannot see its data
            self.run.mark_synthetic()
        return _finite(self._eval["global"])

    def end_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower evaluate_fn (called after each round, and at round 0): write the round's line."""
        self.last_arrays = arrays  # the released global model (after any central-DP noise)
        server_round += self.offset
        if server_round > self.offset:  # a completed round: checkpoint before anything can fail
            self.run.save_checkpoint(server_round, arrays.to_torch_state_dict())
        if not self._eval:
            return None
        record = {"round": server_round, **self._eval, "train": self._train, **self.sites.end_round(server_round)}
        self.run.write_partition(self.sites.declarations())  # deployment: the only partition the server can know
        if self.privacy is not None:
            record["privacy"] = self.privacy.end_round(server_round)
            self.run.write_privacy(self.privacy.report())
        self.run.log_round(record)
        self.history.append(record)
        self._train, self._eval = {}, {}
        if self.privacy is not None:
            self.privacy.check_next_round(server_round)  # central DP: stop before a round beyond the budget
        return _finite(record["global"])


def _finite(metrics: dict[str, float]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in metrics.items() if np.isfinite(v)})
