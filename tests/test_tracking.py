"""MLflow tracking against a real local MLflow store (sqlite in tmp_path), read back with MlflowClient; bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from common.config import RunConfig
from common.ports import free_port
from common.rundir import RunDirectory
from server.tracking import start_tracking

mlflow = pytest.importorskip("mlflow")  # the `test` extra installs it
from mlflow.tracking import MlflowClient  # noqa: E402


def _record(server_round: int, accuracy: float) -> dict:
    return {"round": server_round, "data-kind": "synthetic", "global": {"accuracy": accuracy, "auc": 0.5},
            "sites": {"site-a": {"accuracy": accuracy, "loss": 0.7}},
            "train": {"site-a": {"loss": 0.6, "seconds": 0.1, "examples": 8}},
            "privacy": {"site-a": {"epsilon": 0.5 * server_round, "delta": 1e-5}}}


def _cfg(tmp_path: Path, uri: str, **extra: object) -> RunConfig:
    return RunConfig().override({"output.run-dir": str(tmp_path / "run"), "output.mlflow-uri": uri, **extra})


def test_a_run_and_its_resume_log_every_round_to_one_mlflow_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(tmp_path, uri)
    run = RunDirectory.start(cfg, data_kind="synthetic")
    warnings: list[str] = []
    tracking = start_tracking(cfg, run, warn=warnings.append)
    for r, acc in ((0, 0.5), (1, 0.6)):
        run.log_round(_record(r, acc))
        if r == 0:  # the server dies after round 1's line, before MLflow heard of it: the resume catches up
            tracking.log_round(_record(r, acc))
    run.save_model({"w": torch.ones(2)})
    tracking.finish(run, "failed")
    resumed_cfg = cfg.override({"output.resume": True})
    resumed = start_tracking(resumed_cfg, RunDirectory.start(resumed_cfg, data_kind="synthetic"), warn=warnings.append)
    resumed.log_round(_record(2, 0.7))
    resumed.finish(run, "completed")

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("histofed").experiment_id])
    assert not warnings and len(runs) == 1 and runs[0].info.run_id == run.read_mlflow()["run-id"]
    got = client.get_run(runs[0].info.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["data-kind"] == "synthetic"
    assert got.data.params == {k: str(v) for k, v in cfg.to_flat().items()}  # the resolved config
    history = client.get_metric_history(got.info.run_id, "global.accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.6), (2, 0.7)]
    assert [m.value for m in client.get_metric_history(got.info.run_id, "epsilon.site-a")] == [0.0, 0.5, 1.0]
    assert client.get_metric_history(got.info.run_id, "site.site-a.loss")[0].value == 0.7
    assert {"model.safetensors", "metrics.jsonl", "config.json"} <= {a.path for a in client.list_artifacts(got.info.run_id)}


def test_an_unreachable_tracking_server_warns_once_and_the_run_goes_on(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, f"http://127.0.0.1:{free_port()}")
    run = RunDirectory.start(cfg, data_kind="synthetic")
    warnings: list[str] = []
    tracking = start_tracking(cfg, run, warn=warnings.append)
    tracking.log_round(_record(0, 0.5))
    run.log_round(_record(0, 0.5))
    tracking.finish(run, "completed")
    assert len(warnings) == 1 and "goes on" in warnings[0]
    assert run.history()[0]["global"]["accuracy"] == 0.5  # nothing lost: the run directory has it


def test_mlflow_asked_for_but_not_installed_is_one_line_and_exit_2(tmp_path: Path, monkeypatch) -> None:
    from server.cli import app as server_app
    from simulations.cli import app as sim_app

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    fed = tmp_path / "federation.toml"
    fed.write_text(f'[server]\nport = {free_port()}\nrun-dir = "run"\n[run.output]\nmlflow-uri = "{uri}"\n')
    for app, args in ((sim_app, ["run", "synthetic-tiny", "--set", f"output.mlflow-uri={uri}",
                                 "--run-dir", str(tmp_path / "sim")]),
                      (server_app, ["start", "--config", str(fed), "--insecure"])):
        result = CliRunner().invoke(app, args)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
        assert result.exit_code == 2 and len(lines) == 1, result.stdout + result.stderr
        assert "pip install 'histofed[mlflow]'" in lines[0]
    assert not (tmp_path / "sim" / "flower.log").exists() and not (tmp_path / "run").exists()
