"""Flower ServerApp: read the run config once, run the federation (server.federation), record the outcome."""

from __future__ import annotations

from logging import INFO, WARNING

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from common.card import metadata as card_metadata
from common.config import RunConfig
from common.datasets.registry import data_kind
from common.rundir import RunDirectory
from server.federation import FederationRun
from server.tracking import start_tracking

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation; write the final model and the status (also on failure)."""
    cfg = RunConfig.from_flat(context.run_config)
    run = RunDirectory.start(cfg, data_kind=data_kind(cfg.data.dataset, cfg.data.root))
    log(INFO, "histofed run directory: %s (%s data)", run.path, run.data_kind)
    if len(cfg.federation.training_sites) == 1:
        log(WARNING, "histofed: a federation of ONE site: nothing is shared, this is local training")
    tracking = start_tracking(cfg, run)  # MLflow when output.mlflow-uri is set
    federation: FederationRun | None = None
    try:
        federation = FederationRun(cfg, run, grid, on_round=tracking.log_round)
        final = federation.execute()
        state = final.to_torch_state_dict()
        run.save_model(state, card_metadata(federation.card(), state))  # the model card travels inside the file
        log(INFO, "histofed: final global model written to %s", run.path)
    except BaseException as err:
        problems = federation.sites.summary() if federation is not None else {}
        run.write_status("failed", error=f"{type(err).__name__}: {err}", **problems)
        tracking.finish(run, "failed")
        raise
    last = federation.history[-1] if federation.history else {}
    stopped = federation.stopped
    early = {"stopped-early": stopped, "rounds-completed": last.get("round", 0)} if stopped else {}
    run.write_status("completed", rounds=cfg.federation.rounds, final=last.get("global", {}), **early,
                     **federation.sites.summary())
    tracking.finish(run, "completed")
