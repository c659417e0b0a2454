"""SCAFFOLD as a Flower strategy: FedAvg plus the server control variate c, sent with every train message.

The math is common.scaffold's; this module moves arrays in and out of Flower messages. c goes out as the
ArrayRecord `scaffold-c` beside the model; each reply carries `scaffold-delta-c` beside its weights. The
delta record is taken off every reply before FedAvg averages the weights (Flower averages every
ArrayRecord of a reply together). c and the federation id are strategy state: checkpointed after every
round and restored on resume like FedAdam's moments (server.strategy.STATE_ATTRIBUTES).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from logging import ERROR

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from common import protocol as P
from common.scaffold import server_update, weighted_mean


class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al. 2020): drift-corrected local SGD; c <- c + |S|/N mean dc, x <- x + eta_g mean dy."""

    def __init__(self, *args: object, server_lr: float = 1.0, num_sites: int = 1, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.server_lr = server_lr
        self.num_sites = num_sites
        self.c_global: dict[str, np.ndarray] = {}  # empty = zeros: the sites know the parameter keys
        self.federation_id = {"id": np.array([secrets.randbelow(2**62)], dtype=np.int64)}  # a dict: strategy state
        self._sent_model: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, each also carrying c and the federation id."""
        config[P.SCAFFOLD_FEDERATION] = int(self.federation_id["id"][0])
        self._sent_model = arrays
        messages = list(super().configure_train(server_round, arrays, config, grid))
        c_record = ArrayRecord({k: Array(v) for k, v in self.c_global.items()})
        for msg in messages:
            msg.content[P.SCAFFOLD_C] = c_record
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the weights (FedAvg), then apply the server step and the control-variate update."""
        kept, deltas, weights = [], [], []
        for msg in replies:
            if not msg.has_error():
                delta = msg.content.array_records.get(P.SCAFFOLD_DELTA)
                problem = self._delta_problem(delta, deltas[0] if deltas else None)
                if problem:
                    site = msg.content.config_records.get(P.SITE, {}).get(P.SITE_NAME, msg.metadata.src_node_id)
                    log(ERROR, "Rejected update from site %s: %s", site, problem)
                    continue
                del msg.content[P.SCAFFOLD_DELTA]
                deltas.append({k: np.asarray(delta[k].numpy()) for k in delta.keys()})
                weights.append(float(msg.content[P.METRICS][self.weighted_by_key]))
            kept.append(msg)
        arrays, metrics = super().aggregate_train(server_round, kept)
        if arrays is None or not deltas:
            return arrays, metrics
        mean_y = {k: np.asarray(arrays[k].numpy()) for k in arrays.keys()}
        sent = self._sent_model
        x = {k: np.asarray(sent[k].numpy()) for k in sent.keys()} if sent is not None else mean_y
        new_x, self.c_global = server_update(
            x, mean_y, self.c_global, weighted_mean(deltas, weights), server_lr=self.server_lr,
            participation=min(1.0, len(deltas) / max(self.num_sites, 1)),
        )
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in new_x.items()}), metrics

    def _delta_problem(self, delta: ArrayRecord | None, first: dict[str, np.ndarray] | None) -> str:
        """Why a reply's dc_i cannot be used ('' when it can): missing, keys, shapes, dtype, NaN/Inf."""
        if delta is None:
            return f"no '{P.SCAFFOLD_DELTA}' ArrayRecord in the reply (a site not running SCAFFOLD?)"
        keys = list(delta.keys())
        if first is not None and sorted(keys) != sorted(first):
            return f"'{P.SCAFFOLD_DELTA}' keys differ from the other sites'"
        for key in keys:
            value = np.asarray(delta[key].numpy())
            sent = self._sent_model
            if sent is not None and (key not in sent or tuple(sent[key].shape) != value.shape):
                return f"'{P.SCAFFOLD_DELTA}' entry '{key}' does not fit the global model"
            if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
                return f"'{P.SCAFFOLD_DELTA}' entry '{key}' is not finite floating point"
        return ""
