"""Flower ServerApp: FedAvg over the sites, federated evaluation with pooled metrics, the run directory."""

from __future__ import annotations

from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from common import protocol as P
from common.config import RunConfig
from common.datasets import data_kind, get_dataset
from common.privacy import PrivacyBudgetStop, PrivacyMonitor, build_model_for, is_central, plan_central, preflight
from server.rounds import RoundRecorder
from server.rundir import RunDirectory
from server.sites import SiteRegistry
from server.strategy import build_strategy, restore_strategy_state, strategy_state, wrap_central_dp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the run config once, run the federation, record status even on failure."""
    cfg = RunConfig.from_flat(context.run_config)
    run = RunDirectory.for_config(cfg, data_kind=data_kind(cfg.data.dataset, cfg.data.root))
    log(INFO, "histofed run directory: %s (%s data)", run.path, run.data_kind)
    sites = SiteRegistry.for_config(cfg, run.path)  # node ↔ site from the site keys (deployment), round problems
    if len(cfg.federation.training_sites) == 1:
        log(WARNING, "histofed: a federation of ONE site: nothing is shared, this is local training")
    try:
        recorder = _federate(grid, cfg, run, sites)
    except BaseException as err:
        run.status("failed", error=f"{type(err).__name__}: {err}", **sites.summary())
        raise
    final = recorder.history[-1] if recorder.history else {}
    stopped = recorder.privacy.stopped if recorder.privacy else ""
    early = {"stopped-early": stopped, "rounds-completed": final.get("round", 0)} if stopped else {}
    run.status("completed", rounds=cfg.federation.rounds, final=final.get("global", {}), **early, **sites.summary())


def _federate(grid: Grid, cfg: RunConfig, run: RunDirectory, sites: SiteRegistry) -> RoundRecorder:
    recorder = RoundRecorder(run, cfg.model.num_classes, sites)
    strategy = build_strategy(
        cfg.federation,
        train_metrics=recorder.aggregate_train,
        evaluate_metrics=recorder.aggregate_evaluate,
        sites=sites,
    )
    synthetic = get_dataset(cfg.data.dataset).synthetic  # DP settings are checked before any training
    preflight(cfg, num_examples=cfg.data.train_per_site if synthetic else None)
    torch.manual_seed(cfg.train.seed)  # the initial weights follow the run's seed
    initial = ArrayRecord(build_model_for(cfg.model, cfg.privacy).state_dict())  # DP-compatible when privacy is on
    if cfg.output.resume:  # continue from the last checkpoint, in the model's own key order
        recorder.offset, state = run.load_checkpoint()
        initial = ArrayRecord({key: state[key] for key in initial.keys()})
        restore_strategy_state(strategy, run.load_strategy_state())
        strategy.round_offset = recorder.offset
        log(INFO, "histofed: resuming after round %d of %d", recorder.offset, cfg.federation.rounds)
    strategy.set_reference(initial)
    if cfg.privacy.mode != "off":
        recorder.privacy = monitor = PrivacyMonitor(cfg)
        if cfg.output.resume:  # central DP: the ε already spent is counted again from the report
            monitor.restore(run.read_privacy())
        strategy.on_declined = monitor.declined
        if is_central(cfg.privacy):
            wrapped = wrap_central_dp(strategy, plan_central(cfg), cfg.privacy)
            monitor.clipping_norm_fn = lambda: wrapped.clipping_norm
            strategy = wrapped
    timeout = cfg.federation.round_timeout_s

    def evaluate_fn(server_round: int, arrays: ArrayRecord):
        if server_round == 0 and not cfg.output.resume:  # federated evaluation of the initial model: round 0
            messages = strategy.configure_evaluate(0, arrays, ConfigRecord(), grid)
            strategy.aggregate_evaluate(0, grid.send_and_receive(messages, timeout=timeout))
        metrics = recorder.end_round(server_round, arrays)
        if server_round > 0:
            run.save_strategy_state(strategy_state(strategy))
        return metrics

    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=max(cfg.federation.rounds - recorder.offset, 0),
            timeout=timeout,
            train_config=ConfigRecord({P.ROUND_OFFSET: recorder.offset}),
            evaluate_config=ConfigRecord({P.ROUND_OFFSET: recorder.offset}),
            evaluate_fn=evaluate_fn,
        )
        final = result.arrays or initial
    except PrivacyBudgetStop as stop:  # privacy.on-budget-exhausted=stop, or no site can train any more
        log(WARNING, "histofed: federation stopped early: %s", stop)
        run.write_privacy(recorder.privacy.report())
        final = recorder.last_arrays or initial
    run.save_model(final.to_torch_state_dict())
    log(INFO, "histofed: final global model written to %s", run.path)
    return recorder
