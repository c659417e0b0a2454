"""The run directory: resolved config, metrics per round (JSON Lines), final model (safetensors), status."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import RunConfig
from common.weights import read_state_dict, save_state_dict

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.safetensors"
STATUS_FILE = "status.json"
CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_MODEL = "checkpoint.safetensors"
STRATEGY_STATE = "checkpoint-strategy.safetensors"
PRIVACY_FILE = "privacy.json"
PARTITION_FILE = "partition.json"
DECLARED = "declared by the sites"  # partition.json written by the ServerApp (deployment), not by the planner


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RunDirectory:
    """Writes one run's artefacts; every file says whether the data was synthetic."""

    def __init__(self, path: Path, cfg: RunConfig, *, data_kind: str) -> None:
        self.path = path
        self.data_kind = data_kind
        self.started = time.time()
        path.mkdir(parents=True, exist_ok=True)
        if not cfg.output.resume:  # a resumed run keeps its config and the rounds already written
            (path / METRICS_FILE).write_text("")
            self._write(CONFIG_FILE, {"data-kind": self.data_kind, "config": cfg.to_flat()})
        self.status("running")

    @classmethod
    def for_config(cls, cfg: RunConfig, *, data_kind: str) -> RunDirectory:
        """The configured run directory, or ./runs/<UTC timestamp>."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = Path(cfg.output.run_dir) if cfg.output.run_dir else Path.cwd() / "runs" / stamp
        return cls(path.resolve(), cfg, data_kind=data_kind)

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Append one round's metrics as a JSON line."""
        line = {"data-kind": self.data_kind, "elapsed-s": round(time.time() - self.started, 2), **record}
        with (self.path / METRICS_FILE).open("a") as fh:
            fh.write(json.dumps(_clean(line)) + "\n")

    def save_model(self, state: Mapping[str, torch.Tensor]) -> Path:
        """Write the global model as safetensors."""
        save_state_dict(state, self.path / MODEL_FILE)
        return self.path / MODEL_FILE

    def mark_synthetic(self) -> None:
        """A site reported generated data: every file from now on says synthetic."""
        if self.data_kind != "synthetic":
            self.data_kind = "synthetic"
            saved = json.loads((self.path / CONFIG_FILE).read_text())
            self._write(CONFIG_FILE, {**saved, "data-kind": "synthetic"})

    def save_checkpoint(self, server_round: int, state: Mapping[str, torch.Tensor]) -> None:
        """After every round: the global model and the round it completed (written atomically)."""
        tmp = self.path / f".{CHECKPOINT_MODEL}.tmp"
        save_state_dict(state, tmp)
        tmp.replace(self.path / CHECKPOINT_MODEL)
        self._write(CHECKPOINT_FILE, {"round": server_round, "model": CHECKPOINT_MODEL, "time": time.time()})

    def save_strategy_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Arrays the strategy carries between rounds (FedAdam moments), beside the checkpoint."""
        if state:
            # np.array, not np.ascontiguousarray: that one turns 0-d arrays (num_batches_tracked) into shape (1,)
            save_state_dict({k: torch.from_numpy(np.array(v, order="C")) for k, v in state.items()},
                            self.path / STRATEGY_STATE)

    def load_strategy_state(self) -> dict[str, np.ndarray]:
        """The saved strategy arrays, or {} for a stateless strategy."""
        path = self.path / STRATEGY_STATE
        return {k: v.numpy() for k, v in read_state_dict(path).items()} if path.is_file() else {}

    def load_checkpoint(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The last completed round and its global model; a clear error when there is none."""
        meta = self.path / CHECKPOINT_FILE
        if not meta.is_file():
            raise FileNotFoundError(f"no checkpoint to resume from in {self.path}")
        return int(json.loads(meta.read_text())["round"]), read_state_dict(self.path / CHECKPOINT_MODEL)

    def write_privacy(self, report: Mapping[str, Any]) -> None:
        """Write the privacy report: per site ε(δ) after each round, mechanism, σ, clipping, sampling, steps."""
        self._write(PRIVACY_FILE, {"data-kind": self.data_kind, **report})

    def read_privacy(self) -> dict[str, Any]:
        """The privacy report written so far ({} when there is none): a resumed run continues it."""
        path = self.path / PRIVACY_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_partition(self, sites: Mapping[str, Any]) -> None:
        """partition.json from what the sites declared (deployment); a simulation's own partition.json is kept."""
        path = self.path / PARTITION_FILE
        if path.is_file() and json.loads(path.read_text()).get("source") != DECLARED:
            return
        self._write(PARTITION_FILE, {"source": DECLARED, "data-kind": self.data_kind, "sites": dict(sites)})

    def status(self, state: str, **extra: Any) -> None:
        """Record running / completed / failed (flwr run exits 0 either way; this file tells)."""
        self._write(STATUS_FILE, {"status": state, "data-kind": self.data_kind,
                                  "elapsed-s": round(time.time() - self.started, 2), **extra})

    def _write(self, name: str, obj: Mapping[str, Any]) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(_clean(obj), indent=2))
        tmp.replace(self.path / name)
