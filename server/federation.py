"""One federation run on the server: initial or resumed model, true round numbers, round 0, checkpoints, privacy, the loop.

`FederationRun` drives Flower's strategy through its own public steps (configure_train →
send_and_receive → aggregate_train, then the same for evaluation), as Flower's `Strategy.start`
does, so that the round numbers it passes are the run's TRUE rounds (also after a resume: FedAdam's
bias correction and the sites' seeds depend on them), the initial model is evaluated by the sites as
round 0, and every round ends in one place: privacy accounting, the round's line in the metrics log,
the checkpoint (model + strategy state) and the central-DP budget check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from common import protocol as P
from common.card import ModelCard, card_for_run
from common.card import metadata as card_metadata
from common.config import RunConfig
from common.datasets.registry import get_dataset
from common.model import build_model_for
from common.privacy.monitor import DECLINED, PrivacyBudgetStop, PrivacyMonitor
from common.privacy.preflight import preflight
from common.rundir import RunDirectory
from common.trainable import update_keys
from server.exchange import Exchange, evaluation_views, send_and_receive
from server.rounds import RoundRecorder, site_name
from server.sites import SiteRegistry
from server.updates import Rejected, check_scalars
from server.strategy import build_strategy, restore_strategy_state, strategy_state, wrap_central_dp


class FederationRun:
    """Owns a run's strategy, round numbering, privacy monitor and checkpoints; `execute()` runs the rounds."""

    def __init__(self, cfg: RunConfig, run: RunDirectory, grid: Grid,
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg, self.run, self.grid = cfg, run, grid
        self.on_round = on_round  # e.g. MLflow tracking (server/tracking.py): every round's line as written
        synthetic = get_dataset(cfg.data.dataset).synthetic  # DP settings are checked before any training
        central = preflight(cfg, num_examples=cfg.data.train_per_site if synthetic else None)
        self.sites = SiteRegistry.for_config(cfg, run)  # node ↔ site (site keys), declared sizes, round problems
        self.recorder = RoundRecorder(run, cfg.model.num_classes, self.sites)
        self.monitor = PrivacyMonitor(cfg, central) if cfg.privacy.spec.private else None
        self.keyed = build_strategy(cfg.federation, train_metrics=self.recorder.aggregate_train,
                                    evaluate_metrics=self.recorder.aggregate_evaluate, sites=self.sites)
        torch.manual_seed(cfg.train.seed)  # the initial weights follow the run's seed
        model = build_model_for(cfg.model, cfg.privacy)  # DP-compatible when privacy is on
        state = model.state_dict()
        self.completed = 0  # rounds completed before this process (a resume continues after them)
        if cfg.output.resume:  # continue from the last checkpoint, in the model's own key order
            self.completed, saved = run.load_checkpoint()
            state = {key: saved[key] for key in state}
        # Only the trainable part travels back and is aggregated (and, under central DP, clipped and noised); the
        # frozen part (fine-tuning recipes) goes to the sites with every message and stays bit-identical.
        keys = set(update_keys(model, cfg.model.trainable))
        self.order = list(state)
        initial = ArrayRecord({k: v for k, v in state.items() if k in keys})
        self.frozen = ArrayRecord({k: v for k, v in state.items() if k not in keys})
        if cfg.output.resume:
            restore_strategy_state(self.keyed, run.load_strategy_state())
            if self.monitor is not None:  # central DP: the ε already spent is counted again from the report
                self.monitor.restore(run.read_privacy())
            log(INFO, "histofed: resuming after round %d of %d", self.completed, cfg.federation.rounds)
        self.keyed.set_reference(initial)
        self.strategy = wrap_central_dp(self.keyed, central, cfg.privacy) if central is not None else self.keyed
        self.arrays = initial  # the released global model's trainable part (after any central-DP noise)
        self.frozen_wire = self.keyed.wire_arrays(self.frozen) if len(self.frozen) else None

    @property
    def history(self) -> list[dict[str, Any]]:
        """The rounds recorded by this process."""
        return self.recorder.history

    def card(self, rounds: int | None = None) -> ModelCard:
        """The model card of the global model after `rounds` (default: the last recorded round)."""
        return card_for_run(self.cfg, data_kind=self.run.data_kind, history=self.recorder.history, rounds=rounds,
                            privacy_report=self.monitor.report() if self.monitor is not None else None)

    @property
    def stopped(self) -> str:
        """Why the federation stopped early ('' when it ran every round)."""
        return self.monitor.stopped if self.monitor is not None else ""

    def global_model(self) -> ArrayRecord:
        """The whole global model in the model's key order: the trained part and the frozen part."""
        return ArrayRecord({k: (self.arrays[k] if k in self.arrays else self.frozen[k]) for k in self.order})

    def execute(self) -> ArrayRecord:
        """Round 0 (the initial model, on a fresh run), then every remaining round; returns the global model.

        With federation.evaluate-with-train, round r's train replies also carry the evaluation of the
        model they received (round r-1's), whose line is written when they arrive: one message per
        site and round, and one evaluation message for the last model.
        """
        try:
            if self.cfg.federation.evaluate_with_train:
                self._execute_evaluating_with_train()
                return self.global_model()
            if not self.cfg.output.resume:
                self._evaluate(0)
                self._end_round(0)
            for server_round in range(self.completed + 1, self.cfg.federation.rounds + 1):
                self._train(server_round)
                self._evaluate(server_round)
                self._end_round(server_round)
        except PrivacyBudgetStop as stop:  # privacy.on-budget-exhausted=stop, or no site can train any more
            log(WARNING, "histofed: federation stopped early: %s", stop)
            self.run.write_privacy(self.monitor.report())
        return self.global_model()

    def _execute_evaluating_with_train(self) -> None:
        unevaluated = None if self.cfg.output.resume else 0  # a resumed run's checkpoint has its line already
        for server_round in range(self.completed + 1, self.cfg.federation.rounds + 1):
            self._train(server_round, evaluates=unevaluated)
            unevaluated = server_round
        if unevaluated is not None:  # the last model: its own evaluation message
            self._evaluate(unevaluated)
            self._end_round(unevaluated)

    def _send(self, messages: Any, server_round: int, phase: str) -> Exchange:
        messages = list(messages)
        if self.frozen_wire is not None:  # the frozen part rides along (Flower's messages may share one RecordDict)
            for msg in messages:
                msg.content[P.FROZEN] = self.frozen_wire
        self.run.write_status("running", round=server_round, phase=phase, **{"phase-since": time.time()})
        exchange = send_and_receive(self.grid, messages, timeout=self.cfg.federation.round_timeout_s)
        self.run.log_timing(exchange.timing(server_round, phase))
        return exchange

    def _train(self, server_round: int, evaluates: int | None = None) -> None:
        """Round `server_round`'s training; with `evaluates`, the replies also close that earlier round."""
        log(INFO, "[ROUND %s/%s]", server_round, self.cfg.federation.rounds)
        config = ConfigRecord({P.EVALUATE_RECEIVED: True}) if evaluates is not None else ConfigRecord()
        exchange = self._send(self.strategy.configure_train(server_round, self.arrays, config, self.grid),
                              server_round, "train")
        if evaluates is not None:  # the model these sites received (self.arrays) was round `evaluates`'s
            self.strategy.aggregate_evaluate(evaluates, evaluation_views(exchange))
            self._end_round(evaluates)
        replies = without_declined(server_round, exchange.replies, self.monitor, self.sites)
        if not replies:  # every sampled site declined: the model stays as it is
            return
        norm = getattr(self.strategy, "clipping_norm", None)  # central DP: the norm this round was clipped at
        arrays, _ = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.arrays = arrays
        if self.monitor is not None:  # per-site ε: reported by DP-SGD sites, or accounted here for central DP
            self.monitor.trained(self.recorder.train_metrics, clipping_norm=norm)

    def _evaluate(self, server_round: int) -> None:
        exchange = self._send(self.strategy.configure_evaluate(server_round, self.arrays, ConfigRecord(), self.grid),
                              server_round, "evaluate")
        self.strategy.aggregate_evaluate(server_round, exchange.replies)

    def _end_round(self, server_round: int) -> None:
        if server_round > 0:  # a completed round: checkpoint (with its model card) before anything can fail
            state = self.global_model().to_torch_state_dict()
            self.run.save_checkpoint(server_round, state, card_metadata(self.card(server_round), state))
        extra = {"privacy": self.monitor.end_round(server_round)} if self.monitor is not None else {}
        record = self.recorder.end_round(server_round, extra)
        if record is not None and self.on_round is not None:
            self.on_round(record)
        if self.monitor is not None and record is not None:
            self.run.write_privacy(self.monitor.report())
        if server_round > 0:
            self.run.save_strategy_state(strategy_state(self.keyed))
        if self.monitor is not None:
            self.monitor.check_next_round(server_round)  # central DP: stop before a round beyond the budget



def without_declined(
    server_round: int, replies: list[Message], monitor: PrivacyMonitor | None, sites: SiteRegistry | None = None,
) -> list[Message]:
    """Leave out sites that declined to train (their privacy budget is spent), logged and reported to the monitor.

    Only numbers reach the monitor: a decline whose metrics are not finite numbers is recorded as rejected.
    The monitor applies privacy.on-budget-exhausted: it raises PrivacyBudgetStop when the run must stop.
    """
    declined: dict[str, tuple[MetricRecord, str]] = {}
    kept = []
    for i, msg in enumerate(replies):
        reason = "" if msg.has_error() else msg.content.config_records.get(P.SITE, {}).get(DECLINED, "")
        if not reason:
            kept.append(msg)
            continue
        site = site_name(msg.content, i)
        metrics = msg.content.metric_records.get(P.METRICS, MetricRecord())
        try:
            check_scalars(metrics, list(metrics.keys()))
        except Rejected as err:
            if sites is not None:
                sites.rejected("train", site, f"declined with malformed metrics: {err}")
            continue
        declined[site] = (metrics, str(reason)[:300])
        log(WARNING, "Site %s declined to train: %s", site, reason)
    if declined and monitor is not None:
        monitor.declined(server_round, declined, sum(not msg.has_error() for msg in kept))
    return kept
