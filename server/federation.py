"""One federation run on the server: initial or resumed model, true round numbers, round 0, checkpoints, privacy, the loop.

`FederationRun` drives Flower's strategy through its own public steps (configure_train →
send_and_receive → aggregate_train, then the same for evaluation), as Flower's `Strategy.start`
does, so that the round numbers it passes are the run's TRUE rounds (also after a resume: FedAdam's
bias correction and the sites' seeds depend on them), the initial model is evaluated by the sites as
round 0, and every round ends in one place: privacy accounting, the round's line in the metrics log,
the checkpoint (model + strategy state) and the central-DP budget check.
"""

from __future__ import annotations

from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from common import protocol as P
from common.config import RunConfig
from common.datasets.registry import get_dataset
from common.model import build_model_for
from common.privacy.monitor import DECLINED, PrivacyBudgetStop, PrivacyMonitor
from common.privacy.preflight import preflight
from common.rundir import RunDirectory
from common.trainable import update_keys
from server.rounds import RoundRecorder, site_name
from server.strategy import build_strategy, restore_strategy_state, strategy_state, wrap_central_dp


class FederationRun:
    """Owns a run's strategy, round numbering, privacy monitor and checkpoints; `execute()` runs the rounds."""

    def __init__(self, cfg: RunConfig, run: RunDirectory, grid: Grid) -> None:
        self.cfg, self.run, self.grid = cfg, run, grid
        synthetic = get_dataset(cfg.data.dataset).synthetic  # DP settings are checked before any training
        central = preflight(cfg, num_examples=cfg.data.train_per_site if synthetic else None)
        self.recorder = RoundRecorder(run, cfg.model.num_classes)
        self.monitor = PrivacyMonitor(cfg, central) if cfg.privacy.spec.private else None
        self.keyed = build_strategy(cfg.federation, train_metrics=self.recorder.aggregate_train,
                                    evaluate_metrics=self.recorder.aggregate_evaluate)
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

    @property
    def stopped(self) -> str:
        """Why the federation stopped early ('' when it ran every round)."""
        return self.monitor.stopped if self.monitor is not None else ""

    def global_model(self) -> ArrayRecord:
        """The whole global model in the model's key order: the trained part and the frozen part."""
        return ArrayRecord({k: (self.arrays[k] if k in self.arrays else self.frozen[k]) for k in self.order})

    def execute(self) -> ArrayRecord:
        """Round 0 (the initial model, on a fresh run), then every remaining round; returns the global model."""
        try:
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

    def _send(self, messages: Any) -> list[Message]:
        messages = list(messages)
        if self.frozen_wire is not None:  # the frozen part rides along (Flower's messages may share one RecordDict)
            for msg in messages:
                msg.content[P.FROZEN] = self.frozen_wire
        return list(self.grid.send_and_receive(messages, timeout=self.cfg.federation.round_timeout_s))

    def _train(self, server_round: int) -> None:
        log(INFO, "[ROUND %s/%s]", server_round, self.cfg.federation.rounds)
        replies = without_declined(server_round, self._send(
            self.strategy.configure_train(server_round, self.arrays, ConfigRecord(), self.grid)), self.monitor)
        if not replies:  # every sampled site declined: the model stays as it is
            return
        norm = getattr(self.strategy, "clipping_norm", None)  # central DP: the norm this round was clipped at
        arrays, _ = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.arrays = arrays
        if self.monitor is not None:  # per-site ε: reported by DP-SGD sites, or accounted here for central DP
            self.monitor.trained(self.recorder.train_metrics, clipping_norm=norm)

    def _evaluate(self, server_round: int) -> None:
        replies = self._send(self.strategy.configure_evaluate(server_round, self.arrays, ConfigRecord(), self.grid))
        self.strategy.aggregate_evaluate(server_round, replies)

    def _end_round(self, server_round: int) -> None:
        if server_round > 0:  # a completed round: checkpoint before anything can fail
            self.run.save_checkpoint(server_round, self.global_model().to_torch_state_dict())
        extra = {"privacy": self.monitor.end_round(server_round)} if self.monitor is not None else {}
        record = self.recorder.end_round(server_round, extra)
        if self.monitor is not None and record is not None:
            self.run.write_privacy(self.monitor.report())
        if server_round > 0:
            self.run.save_strategy_state(strategy_state(self.keyed))
        if self.monitor is not None:
            self.monitor.check_next_round(server_round)  # central DP: stop before a round beyond the budget



def without_declined(server_round: int, replies: list[Message], monitor: PrivacyMonitor | None) -> list[Message]:
    """Leave out sites that declined to train (their privacy budget is spent), logged and reported to the monitor.

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
        declined[site] = (msg.content.metric_records.get(P.METRICS, MetricRecord()), str(reason))
        log(WARNING, "Site %s declined to train: %s", site, reason)
    if declined and monitor is not None:
        monitor.declined(server_round, declined, sum(not msg.has_error() for msg in kept))
    return kept
