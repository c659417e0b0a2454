"""Optional MLflow tracking of a federation run: config as params, metrics per round, ε per site, the model and report as artifacts.

Off unless `output.mlflow-uri` is set (`pip install 'histofed[mlflow]'`). The ServerApp logs (in
simulation and in deployment); the MLflow run id is kept in the run directory (RunDirectory.MLFLOW),
so a resumed run continues the same MLflow run. Tracking never stops a federation: when the
tracking server cannot be reached the ServerApp warns once and goes on; the run directory holds
everything regardless.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Iterable, Mapping
from logging import WARNING
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from common.config import RunConfig
from common.errors import ConfigError
from common.rundir import RunDirectory

INSTALL_HINT = "pip install 'histofed[mlflow]'"
PARAM_BATCH = 100  # MLflow's limit of params per log_batch call


def mlflow_installed() -> bool:
    """Whether MLflow can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):
        return False


def preflight(cfg: RunConfig) -> None:
    """MLflow asked for but not installed: a one-line ConfigError with how to install it (exit 2 before anything starts)."""
    if cfg.output.mlflow_uri and not mlflow_installed():
        raise ConfigError(f"output.mlflow-uri is set but MLflow is not installed: {INSTALL_HINT}")


class Tracking:
    """No tracking (the default): every call does nothing."""

    def log_round(self, record: Mapping[str, Any]) -> None:
        """One round's line of the metrics log."""

    def finish(self, run: RunDirectory, status: str) -> None:
        """The run ended ('completed' or 'failed'): artifacts and the final state."""


class MlflowTracking(Tracking):
    """Logs to one MLflow run through MlflowClient (no global active run); disables itself after the first failure."""

    def __init__(self, cfg: RunConfig, run: RunDirectory, warn: Callable[[str], None]) -> None:
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # an unreachable server: fail in seconds
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self.warn, self.enabled = cfg.output.mlflow_uri, warn, True
        self.client = MlflowClient(tracking_uri=self.uri)
        self.data_kind = run.data_kind
        saved = run.read_mlflow()
        self.run_id = str(saved.get("run-id", "")) if cfg.output.resume and saved.get("tracking-uri") == self.uri else ""
        self._call(lambda: self._open(cfg, run))

    def _open(self, cfg: RunConfig, run: RunDirectory) -> None:
        if self.run_id:  # resumed: the same MLflow run goes on, with any round it missed (a crash after the line)
            self.client.update_run(self.run_id, status="RUNNING")
            logged = {m.step for m in self.client.get_metric_history(self.run_id, "global.accuracy")}
            for record in run.history():
                if int(record["round"]) not in logged:
                    self._log_round(record)
            return
        name = cfg.output.mlflow_experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            name, artifact_location=_local_artifact_root(self.uri))
        created = self.client.create_run(experiment_id, run_name=run.path.name,
                                         tags={"data-kind": run.data_kind, "histofed.run-dir": str(run.path)})
        self.run_id = created.info.run_id
        run.write_mlflow({"tracking-uri": self.uri, "experiment": name, "run-id": self.run_id})
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in cfg.to_flat().items()]
        for i in range(0, len(params), PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + PARAM_BATCH])

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Global and per-site metrics, per-site training loss and ε, at step = the round."""
        self._call(lambda: self._log_round(record))

    def _log_round(self, record: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        step, kind = int(record["round"]), str(record.get("data-kind", self.data_kind))
        if kind != self.data_kind:  # a site said its data is synthetic: the tag says so from now on
            self.client.set_tag(self.run_id, "data-kind", kind)
            self.data_kind = kind
        metrics = [Metric(_key(k), float(v), 0, step) for k, v in round_metrics(record).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def finish(self, run: RunDirectory, status: str) -> None:
        """The model and the run's files as artifacts (the report when it exists), then the run's end state."""
        def close() -> None:
            for name in (RunDirectory.MODEL, RunDirectory.CONFIG, RunDirectory.METRICS, RunDirectory.PRIVACY,
                         RunDirectory.STATUS, RunDirectory.REPORT_HTML):
                if run.file(name).is_file():
                    self.client.log_artifact(self.run_id, str(run.file(name)))
            self.client.set_terminated(self.run_id, "FINISHED" if status == "completed" else "FAILED")

        self._call(close)

    def _call(self, action: Callable[[], None]) -> None:
        if not self.enabled:
            return
        try:
            action()
        except Exception as err:  # noqa: BLE001 - tracking must never stop a federation
            self.enabled = False
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self.warn(f"MLflow tracking at {self.uri} failed ({first[:200]}); the federation goes on without it, "
                      "everything is in the run directory")


def start_tracking(cfg: RunConfig, run: RunDirectory, warn: Callable[[str], None] | None = None) -> Tracking:
    """The run's tracking: MLflow when output.mlflow-uri is set, else nothing."""
    if not cfg.output.mlflow_uri:
        return Tracking()
    if warn is None:
        from flwr.supercore import log

        warn = lambda text: log(WARNING, "histofed: %s", text)  # noqa: E731
    return MlflowTracking(cfg, run, warn)


def log_report(run_dir: Path, files: Iterable[Path]) -> None:
    """Add report files to the run's MLflow run (flower-sim writes the report after the ServerApp ended)."""
    saved = RunDirectory(run_dir).read_mlflow()
    if not saved.get("run-id") or not mlflow_installed():
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=saved["tracking-uri"])
    for path in files:
        if path.is_dir():
            client.log_artifacts(saved["run-id"], str(path), artifact_path=path.name)
        elif path.is_file():
            client.log_artifact(saved["run-id"], str(path))


def round_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """A metrics-log line as flat MLflow metrics: global.*, site.<name>.*, train.<name>.*, epsilon.<name>."""
    out: dict[str, float] = {}
    for key, value in record.get("global", {}).items():
        out[f"global.{key}"] = value
    for scope in ("sites", "train"):
        prefix = "site" if scope == "sites" else "train"
        for site, values in record.get(scope, {}).items():
            for key, value in values.items():
                out[f"{prefix}.{site}.{key}"] = value
    for site, entry in (record.get("privacy") or {}).items():
        if isinstance(entry, Mapping) and "epsilon" in entry:
            out[f"epsilon.{site}"] = entry["epsilon"]
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and float(v) == float(v) and abs(float(v)) != float("inf")}


def _key(name: str) -> str:
    return re.sub(r"[^\w\-. /]", "_", name)


def _local_artifact_root(uri: str) -> str | None:
    """For a local store (sqlite:/// or file:), artifacts beside it, not in the ServerApp's working folder."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    if parsed.scheme == "file":
        return (Path(parsed.path) / "mlartifacts").resolve().as_uri()
    return None
