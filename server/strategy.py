"""Strategy registry: Flower's own strategies, guarded so weights stay keyed and typed like the global model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import ERROR

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedTrimmedAvg, Krum, Strategy
from flwr.supercore import log

from common import protocol as P
from common.config import FederationConfig, PrivacyConfig
from common.privacy.accounting import CentralPlan
from server.scaffold import Scaffold


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
    max_update_norm: float = 0.0

    def __init__(
        self, *args: object, transfer_dtype: str = "float32", max_update_norm: float = 0.0, **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.transfer_dtype = transfer_dtype
        self.max_update_norm = max_update_norm

    def set_reference(self, arrays: ArrayRecord) -> None:
        """Remember key set, shapes and dtypes of the global model."""
        self.reference = arrays

    def wire_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """The global model as sent to sites: floating arrays in the transfer dtype, integers unchanged."""
        return _cast(arrays, {k: self.transfer_dtype for k in arrays.keys() if _floating(arrays[k])})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's configure_train on the master weights (FedAdam keeps them); the messages carry the transfer dtype."""
        return self._on_wire(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's configure_evaluate; the messages carry the model in the transfer dtype."""
        return self._on_wire(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[misc]

    def _on_wire(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for msg in messages:  # Flower's messages share one RecordDict: the cast happens once
            if P.ARRAYS in msg.content.array_records:
                msg.content[P.ARRAYS] = self.wire_arrays(msg.content[P.ARRAYS])
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate keys/shapes of every reply, aggregate with the base strategy, cast back (declined sites already left out)."""
        replies = list(replies)
        if not replies:  # every sampled site declined: the model stays as it is
            return None, None
        valid = sorted(  # a fixed order makes the floating-point sum independent of reply arrival
            (msg for msg in replies if msg.has_error() or self._fits(msg)), key=_site_key
        )
        usable = sum(not msg.has_error() for msg in valid)
        required = min(max(1, getattr(self, "min_train_nodes", 1)), len(replies))  # declined sites left out
        if usable < required:
            raise RuntimeError(
                f"round {server_round}: {usable} valid model update(s), fewer than the {required} required "
                "(federation.min-train-sites); rejected updates are logged with their site"
            )
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
        problem = _mismatch(self.reference, got) or _unsafe(self.reference, got, self.max_update_norm)
        if problem:
            log(ERROR, "Rejected update from site %s: %s", site, problem)
        return not problem


def _floating(array: Array) -> bool:
    return np.issubdtype(np.dtype(array.dtype), np.floating)


def _cast(arrays: ArrayRecord, dtypes: dict[str, str]) -> ArrayRecord:
    """Arrays cast by key to `dtypes`; the same record when nothing changes, else unchanged arrays keep their bytes."""
    todo = {k for k in arrays.keys() if k in dtypes and arrays[k].dtype != dtypes[k]}
    if not todo:
        return arrays
    return ArrayRecord({k: Array(np.asarray(arrays[k].numpy()).astype(dtypes[k])) if k in todo else arrays[k]
                        for k in arrays.keys()})


def _site_key(msg: Message) -> str:
    if msg.has_error():
        return f"~error-{msg.metadata.src_node_id}"
    return str(msg.content.config_records.get(P.SITE, {}).get(P.SITE_NAME, msg.metadata.src_node_id))


def _unsafe(reference: ArrayRecord, got: ArrayRecord, max_norm: float) -> str:
    """NaN/Inf anywhere, or an update (reply minus global model) longer than max_norm (0 = no bound)."""
    squares = 0.0
    for key in reference.keys():
        new = np.asarray(got[key].numpy())
        if not np.issubdtype(new.dtype, np.floating):
            continue
        if not np.isfinite(new).all():
            return f"non-finite values (NaN/Inf) in '{key}'"
        if max_norm > 0:
            old = np.asarray(reference[key].numpy(), dtype=np.float64)
            squares += float(np.sum((new.astype(np.float64) - old) ** 2))
    if max_norm > 0 and squares ** 0.5 > max_norm:
        return f"update norm {squares ** 0.5:.3g} exceeds federation.max-update-norm {max_norm:g}"
    return ""


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


class HistoFedProx(KeyedAggregation, FedProx):
    """FedProx (Li et al. 2020): Flower sends proximal-mu, each client adds the proximal term."""


class HistoFedAdam(KeyedAggregation, FedAdam):
    """FedAdam (Reddi et al. 2021): Adam on the averaged update at the server; moments are checkpointed."""


class HistoTrimmedMean(KeyedAggregation, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (Yin et al. 2018): robust to a share of outlying sites."""


class HistoKrum(KeyedAggregation, Krum):
    """Krum (Blanchard et al. 2017): keeps the update closest to its neighbours."""


class HistoScaffold(KeyedAggregation, Scaffold):
    """SCAFFOLD (Karimireddy et al. 2020): control variates correct client drift; c is checkpointed."""


# name → (class, the extra constructor arguments it takes from the federation config)
STRATEGIES: dict[str, tuple[type[Strategy], Callable[[FederationConfig], dict]]] = {
    "fedavg": (HistoFedAvg, lambda cfg: {}),
    "fedprox": (HistoFedProx, lambda cfg: {"proximal_mu": cfg.proximal_mu}),
    "fedadam": (HistoFedAdam, lambda cfg: {"eta": cfg.server_lr}),
    "trimmed-mean": (HistoTrimmedMean, lambda cfg: {"beta": cfg.trim_beta}),
    "krum": (HistoKrum, lambda cfg: {"num_malicious_nodes": cfg.krum_malicious}),
    "scaffold": (HistoScaffold, lambda cfg: {"server_lr": cfg.scaffold_lr, "num_sites": len(cfg.training_sites)}),
}
# saved with every checkpoint: FedAdam's moments; SCAFFOLD's server control variate and federation id
STATE_ATTRIBUTES = ("m_t", "v_t", "c_global", "federation_id")


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """Arrays a strategy keeps between rounds (e.g. FedAdam moments), flat 'attribute/key' names."""
    inner = getattr(strategy, "strategy", strategy)  # a DP wrapper holds the strategy it wraps
    return {f"{attr}/{k}": np.asarray(v) for attr in STATE_ATTRIBUTES
            for k, v in (getattr(inner, attr, None) or {}).items()}


def restore_strategy_state(strategy: Strategy, state: Mapping[str, np.ndarray]) -> None:
    """Put saved strategy arrays back (resume)."""
    inner = getattr(strategy, "strategy", strategy)
    for attr in STATE_ATTRIBUTES:
        values = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{attr}/")}
        if values:
            setattr(inner, attr, values)


def build_strategy(
    cfg: FederationConfig,
    *,
    train_metrics: Callable[..., MetricRecord],
    evaluate_metrics: Callable[..., MetricRecord],
) -> Strategy:
    """Instantiate the configured strategy with histofed's metric aggregation."""
    cls, extra = STRATEGIES[cfg.strategy]
    return cls(
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
        max_update_norm=cfg.max_update_norm,
        **extra(cfg),
    )


def wrap_central_dp(strategy: Strategy, plan: CentralPlan, privacy: PrivacyConfig) -> Strategy:
    """Flower's central-DP wrapper named by the privacy-mode table around the strategy (fixed: McMahan et al. 2018; adaptive: Andrew et al. 2021).

    Adaptive clipping spends part of the privacy on the noisy clipped-count: its std is Andrew et al.'s
    sites/20, raised to 1.58·σ when that is too small (a few hospitals), i.e. about 10 % of the budget.
    """
    spec = privacy.spec
    if not spec.central:
        raise ValueError(f"privacy.mode '{spec.name}' is not a central-DP mode")
    wrapper = getattr(flwr_strategies, spec.server_wrapper)
    z, norm, sampled = plan.noise_multiplier, plan.clipping_norm, plan.num_sampled
    if not spec.adaptive:
        return wrapper(strategy, z, norm, sampled)
    return wrapper(strategy, z, sampled, initial_clipping_norm=norm, target_clipped_quantile=privacy.target_clipped_quantile,
                   clip_norm_lr=privacy.clip_norm_lr, clipped_count_stddev=max(sampled / 20, 1.58 * z))
