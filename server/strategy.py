"""Strategy registry: Flower's own strategies, guarded so weights stay keyed and typed like the global model."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import ERROR

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore import log

from common import protocol as P
from common.config import FederationConfig


class KeyedAggregation:
    """Mixin: drop replies whose arrays do not match the global model by key/shape; restore dtypes.

    Flower averages every array in floating point, so int64 buffers (BatchNorm's
    `num_batches_tracked`) would come back as float64 and fail the strict load on clients.
    Running means/variances are averaged like weights (example-weighted FedAvg).
    With `transfer_dtype="float16"` the global model travels as float16, but the reference
    (the master weights) stays float32 and every reply is cast back to it BEFORE averaging.
    """

    reference: ArrayRecord | None = None
    transfer_dtype: str = "float32"

    def __init__(self, *args: object, transfer_dtype: str = "float32", **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.transfer_dtype = transfer_dtype

    def set_reference(self, arrays: ArrayRecord) -> None:
        """Remember key set, shapes and dtypes of the global model."""
        self.reference = arrays

    def wire_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """The global model as sent to sites: floating arrays in the transfer dtype, integers unchanged."""
        return _cast(arrays, {k: self.transfer_dtype for k in arrays.keys() if _floating(arrays[k])})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's configure_train with the model in the transfer dtype."""
        return super().configure_train(server_round, self.wire_arrays(arrays), config, grid)  # type: ignore[misc]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's configure_evaluate with the model in the transfer dtype."""
        return super().configure_evaluate(server_round, self.wire_arrays(arrays), config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate keys/shapes of every reply, aggregate with the base strategy, cast back."""
        replies = list(replies)
        valid = sorted(  # a fixed order makes the floating-point sum independent of reply arrival
            (msg for msg in replies if msg.has_error() or self._fits(msg)), key=_site_key
        )
        if replies and not any(not msg.has_error() for msg in valid):
            raise RuntimeError(f"round {server_round}: no valid model update from any site")
        for msg in valid:  # float16 replies are averaged in the master dtype (float32), not in float16
            if self.reference is not None and not msg.has_error():
                msg.content[P.ARRAYS] = self._like_reference(msg.content[P.ARRAYS])
        arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
        if arrays is not None and self.reference is not None:
            arrays = self._like_reference(arrays)
            self.reference = arrays
        return arrays, metrics

    def _like_reference(self, arrays: ArrayRecord) -> ArrayRecord:
        assert self.reference is not None
        return _cast(arrays, {k: self.reference[k].dtype for k in self.reference.keys()})

    def _fits(self, msg: Message) -> bool:
        if self.reference is None:
            return True
        got = msg.content.array_records.get(P.ARRAYS)
        site = msg.content.config_records.get(P.SITE, {}).get(P.SITE_NAME, msg.metadata.src_node_id)
        problem = _mismatch(self.reference, got)
        if problem:
            log(ERROR, "Rejected update from site %s: %s", site, problem)
        return not problem


def _floating(array: Array) -> bool:
    return np.issubdtype(np.dtype(array.dtype), np.floating)


def _cast(arrays: ArrayRecord, dtypes: dict[str, str]) -> ArrayRecord:
    """Arrays cast by key to `dtypes` (others, and those already right, reused without re-serialising)."""
    out = {}
    for key in arrays.keys():
        arr, want = arrays[key], dtypes.get(key)
        out[key] = arr if want is None or arr.dtype == want else Array(np.asarray(arr.numpy()).astype(want))
    return ArrayRecord(out)


def _site_key(msg: Message) -> str:
    if msg.has_error():
        return f"~error-{msg.metadata.src_node_id}"
    return str(msg.content.config_records.get(P.SITE, {}).get(P.SITE_NAME, msg.metadata.src_node_id))


def _mismatch(reference: ArrayRecord, got: ArrayRecord | None) -> str:
    if got is None:
        return f"no '{P.ARRAYS}' ArrayRecord in the reply"
    missing = [k for k in reference.keys() if k not in got]
    extra = [k for k in got.keys() if k not in reference]
    if missing or extra:
        first = (missing or extra)[0]
        return f"{len(missing)} missing / {len(extra)} unexpected keys (first '{first}')"
    for key in reference.keys():
        if tuple(reference[key].shape) != tuple(got[key].shape):
            return f"shape of '{key}' is {tuple(got[key].shape)}, expected {tuple(reference[key].shape)}"
    return ""


class HistoFedAvg(KeyedAggregation, FedAvg):
    """FedAvg (McMahan et al. 2017, example-weighted mean) with keyed validation and dtype restore."""


STRATEGIES: dict[str, type[Strategy]] = {"fedavg": HistoFedAvg}


def build_strategy(
    cfg: FederationConfig,
    *,
    train_metrics: Callable[..., MetricRecord],
    evaluate_metrics: Callable[..., MetricRecord],
) -> Strategy:
    """Instantiate the configured strategy with histofed's metric aggregation."""
    return STRATEGIES[cfg.strategy](
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_sites,
        min_evaluate_nodes=cfg.min_evaluate_sites,
        min_available_nodes=cfg.min_available_sites,
        weighted_by_key=P.NUM_EXAMPLES,
        arrayrecord_key=P.ARRAYS,
        configrecord_key=P.CONFIG,
        train_metrics_aggr_fn=train_metrics,
        evaluate_metrics_aggr_fn=evaluate_metrics,
        transfer_dtype=cfg.transfer_dtype,
    )
