"""The run directory: the one place that names its files, and reads and writes them (config, rounds, model, status, checkpoints).

Every file a run writes says whether the data was synthetic. The ServerApp writes through
`RunDirectory.start`; commands, reports and benchmarks read through a plain `RunDirectory(path)`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from common.jsonsafe import json_safe
from common.weights import read_state_dict, save_state_dict

if TYPE_CHECKING:
    from common.config import RunConfig


class RunDirectory:
    """One run's folder: file names, readers and writers (writers stamp every file with the data kind)."""

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    TIMING = "timing.jsonl"  # one line per reply: when it was sent and received, and the site's stamps
    MLFLOW = "mlflow.json"  # the MLflow run this run logs to (a resumed run continues it)
    MODEL = "model.safetensors"
    STATUS = "status.json"
    CHECKPOINT = "checkpoint.json"
    CHECKPOINT_MODEL = "checkpoint.safetensors"
    STRATEGY_STATE = "checkpoint-strategy.safetensors"
    PRIVACY = "privacy.json"
    PARTITION = "partition.json"
    SCORES = "scores.json"  # the latest evaluated round's score histograms, pooled and per site
    REPORT_HTML = "report.html"
    REPORT_DIR = "report"
    RUN_CONFIG = "run-config.toml"
    FLOWER_LOG = "flower.log"
    FLWR_HOME = ".flwr"
    SUPERLINK_LOG = "superlink.log"
    STATE_DB = "state.db"
    NODE_SITES = "node-sites.json"  # deployment: which SuperNode id belongs to which site's key
    DECLARED = "declared by the sites"  # source of a partition record written by the ServerApp (deployment)
    SITE_STATE = "privacy-ledger"  # per-site state in simulation: ledgers, FedBN layers

    def __init__(self, path: Path, *, data_kind: str = "unknown") -> None:
        self.path = Path(path)
        self.data_kind = data_kind
        self.started = time.time()

    @classmethod
    def start(cls, cfg: RunConfig, *, data_kind: str) -> RunDirectory:
        """The ServerApp's run directory (output.run-dir, or ./runs/<UTC time>), config written, status running."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = Path(cfg.output.run_dir) if cfg.output.run_dir else Path.cwd() / "runs" / stamp
        run = cls(path.resolve(), data_kind=data_kind)
        run.path.mkdir(parents=True, exist_ok=True)
        if not cfg.output.resume:  # a resumed run keeps its config and the rounds already written
            (run.path / cls.METRICS).write_text("")
            (run.path / cls.TIMING).unlink(missing_ok=True)
            run._write(cls.CONFIG, {"data-kind": data_kind, "config": cfg.to_flat()})
        run.write_status("running")
        return run

    # ---- paths -------------------------------------------------------------------------------

    def file(self, name: str) -> Path:
        """The path of one of the class's file names (e.g. `run.file(RunDirectory.MODEL)`)."""
        return self.path / name

    @property
    def model_file(self) -> Path:
        """The final global model (safetensors)."""
        return self.path / self.MODEL

    @property
    def flwr_home(self) -> Path:
        """The run's private FLWR_HOME (the user's ~/.flwr is never touched)."""
        return self.path / self.FLWR_HOME

    @property
    def site_state_dir(self) -> Path:
        """Per-site state folder of a simulation (every simulated site shares this machine)."""
        return self.path / self.SITE_STATE

    def is_run(self) -> bool:
        """Whether this folder holds a histofed run (its config was written)."""
        return (self.path / self.CONFIG).is_file()

    def has_checkpoint(self) -> bool:
        """Whether a completed round was checkpointed (a resume can continue it)."""
        return (self.path / self.CHECKPOINT).is_file()

    # ---- readers -----------------------------------------------------------------------------

    def read_config(self) -> tuple[dict[str, Any], str]:
        """The flat configuration the run was started with, and its data kind."""
        saved = json.loads((self.path / self.CONFIG).read_text())
        return dict(saved["config"]), str(saved.get("data-kind", "unknown"))

    def history(self) -> list[dict[str, Any]]:
        """Rounds written so far to metrics.jsonl (a partial last line is ignored)."""
        path = self.path / self.METRICS
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return out

    def timing(self) -> list[dict[str, Any]]:
        """The per-reply timing records written so far (server/exchange.py)."""
        path = self.path / self.TIMING
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def read_mlflow(self) -> dict[str, Any]:
        """The MLflow run this run logs to ({} when none yet)."""
        path = self.path / self.MLFLOW
        return json.loads(path.read_text()) if path.is_file() else {}

    def read_status(self) -> dict[str, Any]:
        """The ServerApp's status marker, or {} if it never wrote one."""
        try:
            return json.loads((self.path / self.STATUS).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def load_model(self) -> dict[str, torch.Tensor]:
        """The final global model's tensors."""
        return read_state_dict(self.model_file)

    def load_checkpoint(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The last completed round and its global model; a clear error when there is none."""
        meta = self.path / self.CHECKPOINT
        if not meta.is_file():
            raise FileNotFoundError(f"no checkpoint to resume from in {self.path}")
        return int(json.loads(meta.read_text())["round"]), read_state_dict(self.path / self.CHECKPOINT_MODEL)

    def load_strategy_state(self) -> dict[str, np.ndarray]:
        """The saved strategy arrays, or {} for a stateless strategy."""
        path = self.path / self.STRATEGY_STATE
        return {k: v.numpy() for k, v in read_state_dict(path).items()} if path.is_file() else {}

    def read_privacy(self) -> dict[str, Any]:
        """The privacy report written so far ({} when there is none): a resumed run continues it."""
        path = self.path / self.PRIVACY
        return json.loads(path.read_text()) if path.is_file() else {}

    def read_partition(self) -> dict[str, Any]:
        """Which patients each site holds ({} when the run has no partition record)."""
        path = self.path / self.PARTITION
        return json.loads(path.read_text()) if path.is_file() else {}

    def read_scores(self) -> dict[str, Any]:
        """The latest evaluated round's score histograms ({} when none were written): round, global, sites."""
        path = self.path / self.SCORES
        return json.loads(path.read_text()) if path.is_file() else {}

    # ---- writers -----------------------------------------------------------------------------

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Append one round's metrics as a JSON line."""
        line = {"data-kind": self.data_kind, "elapsed-s": round(time.time() - self.started, 2), **record}
        with (self.path / self.METRICS).open("a") as fh:
            fh.write(json.dumps(json_safe(line)) + "\n")

    def write_scores(self, server_round: int, scores: Mapping[str, Any]) -> None:
        """Replace the score histograms (K x 2 x bins, ascending score order) with this round's."""
        self._write(self.SCORES, {"data-kind": self.data_kind, "round": server_round, **scores}, indent=None)

    def log_timing(self, records: list[Mapping[str, Any]]) -> None:
        """Append per-reply timing records as JSON lines."""
        if records:
            with (self.path / self.TIMING).open("a") as fh:
                fh.writelines(json.dumps(json_safe(r)) + "\n" for r in records)

    def write_mlflow(self, info: Mapping[str, Any]) -> None:
        """Record the MLflow run (tracking URI, experiment, run id) so that a resume continues it."""
        self._write(self.MLFLOW, info)

    def save_model(self, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
        """Write the global model as safetensors (metadata: its model card, common.card.metadata)."""
        save_state_dict(state, self.model_file, metadata)
        return self.model_file

    def mark_synthetic(self) -> None:
        """A site reported generated data: every file from now on says synthetic."""
        if self.data_kind != "synthetic":
            self.data_kind = "synthetic"
            saved = json.loads((self.path / self.CONFIG).read_text())
            self._write(self.CONFIG, {**saved, "data-kind": "synthetic"})

    def save_checkpoint(
        self, server_round: int, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
    ) -> None:
        """After every round: the global model (with its card) and the round it completed (written atomically)."""
        save_state_dict(state, self.path / self.CHECKPOINT_MODEL, metadata)
        self._write(self.CHECKPOINT, {"round": server_round, "model": self.CHECKPOINT_MODEL, "time": time.time()})

    def save_strategy_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Arrays the strategy carries between rounds (FedAdam moments), beside the checkpoint."""
        if state:
            # np.array, not np.ascontiguousarray: that one turns 0-d arrays (num_batches_tracked) into shape (1,)
            save_state_dict({k: torch.from_numpy(np.array(v, order="C")) for k, v in state.items()},
                            self.path / self.STRATEGY_STATE)

    def write_privacy(self, report: Mapping[str, Any]) -> None:
        """Write the privacy report: per site ε(δ) after each round, mechanism, σ, clipping, sampling, steps."""
        self._write(self.PRIVACY, {"data-kind": self.data_kind, **report})

    def write_partition(self, partition: Mapping[str, Any]) -> None:
        """Record which patients each site holds (an audit record: a run can be checked and repeated)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._write(self.PARTITION, partition)

    def write_declared_partition(self, sites: Mapping[str, Any]) -> None:
        """The partition record from what the sites declared (deployment); a simulation's own record is kept."""
        path = self.path / self.PARTITION
        if path.is_file() and json.loads(path.read_text()).get("source") != self.DECLARED:
            return
        self._write(self.PARTITION, {"source": self.DECLARED, "data-kind": self.data_kind, "sites": dict(sites)})

    def read_declared_partition(self) -> dict[str, Any]:
        """The sites' declarations from an earlier process of this run ({} when the record is the planner's)."""
        saved = self.read_partition()
        return dict(saved.get("sites", {})) if saved.get("source") == self.DECLARED else {}

    def mark_interrupted(self) -> None:
        """After Ctrl-C / SIGTERM: the status says 'interrupted' (a completed run stays completed)."""
        status = self.read_status()
        if not self.path.is_dir() or status.get("status") == "completed":
            return
        self._write(self.STATUS, {**status, "status": "interrupted", "interrupted-at": time.time(),
                                  "note": "stopped by the operator (Ctrl-C / SIGTERM); continue with --resume"})

    def write_status(self, state: str, **extra: Any) -> None:
        """Record running / completed / failed (flwr run exits 0 either way; this file tells)."""
        self._write(self.STATUS, {"status": state, "data-kind": self.data_kind,
                                  "elapsed-s": round(time.time() - self.started, 2), **extra})

    def clear_status(self) -> None:
        """Forget a previous status (a resumed run's old 'completed' must not end the new one)."""
        (self.path / self.STATUS).unlink(missing_ok=True)

    def _write(self, name: str, obj: Mapping[str, Any], indent: int | None = 2) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(json_safe(obj), indent=indent))
        tmp.replace(self.path / name)
