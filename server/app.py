"""Flower ServerApp: FedAvg over the sites, federated evaluation with pooled metrics, the run directory."""

from __future__ import annotations

from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from common.config import RunConfig
from common.datasets import data_kind
from common.model import build_model
from server.rounds import RoundRecorder
from server.rundir import RunDirectory
from server.strategy import build_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the run config once, run the federation, record status even on failure."""
    cfg = RunConfig.from_flat(context.run_config)
    run = RunDirectory.for_config(cfg, data_kind=data_kind(cfg.data.dataset, cfg.data.root))
    log(INFO, "histofed run directory: %s (%s data)", run.path, run.data_kind)
    try:
        recorder = _federate(grid, cfg, run)
    except BaseException as err:
        run.status("failed", error=f"{type(err).__name__}: {err}")
        raise
    final = recorder.history[-1] if recorder.history else {}
    run.status("completed", rounds=cfg.federation.rounds, final=final.get("global", {}))


def _federate(grid: Grid, cfg: RunConfig, run: RunDirectory) -> RoundRecorder:
    recorder = RoundRecorder(run, cfg.model.num_classes)
    strategy = build_strategy(
        cfg.federation,
        train_metrics=recorder.aggregate_train,
        evaluate_metrics=recorder.aggregate_evaluate,
    )
    torch.manual_seed(cfg.train.seed)  # the initial weights follow the run's seed
    initial = ArrayRecord(build_model(cfg.model).state_dict())
    strategy.set_reference(initial)
    timeout = cfg.federation.round_timeout_s

    def evaluate_fn(server_round: int, arrays: ArrayRecord):
        if server_round == 0:  # federated evaluation of the initial model: the round-0 baseline
            messages = strategy.configure_evaluate(0, arrays, ConfigRecord(), grid)
            strategy.aggregate_evaluate(0, grid.send_and_receive(messages, timeout=timeout))
        return recorder.end_round(server_round, arrays)

    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=cfg.federation.rounds,
        timeout=timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=evaluate_fn,
    )
    run.save_model((result.arrays or initial).to_torch_state_dict())
    log(INFO, "histofed: final global model written to %s", run.path)
    return recorder
