"""Strategy registry: Flower's own strategies, guarded so weights stay keyed and typed like the global model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import ERROR

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedTrimmedAvg, Krum, Strategy
from flwr.supercore import log

from common import protocol as P
from common.config import FederationConfig, PrivacyConfig
from common.privacy.accounting import CentralPlan
from server.scaffold import Scaffold
from server.sites import SiteFailure, SiteRegistry
from server.updates import Declared, Rejected, screen_evaluate, screen_train, usable_weights


class KeyedAggregation:
    """Mixin: screen every reply at the boundary (server/updates.py, against the global model); restore dtypes.

    A reply is used only if its node is who it claims (site keys), its arrays match the global model's
    keys, shapes and dtypes (float16 on the wire when transfer-dtype=float16) and are finite after the
    cast to the master dtype, its update is within max-update-norm, and its counts are within what the
    site declared at round 0. Failures and rejections are recorded per round in `sites` (SiteRegistry).

    Flower averages every array in floating point, so int64 buffers (BatchNorm's
    `num_batches_tracked`) would come back as float64 and fail the strict load on clients.
    Running means/variances are averaged like weights (example-weighted FedAvg).
    With `transfer_dtype="float16"` the global model travels as float16, but the reference
    (the master weights) stays float32 and every reply is cast back to it BEFORE averaging.
    """

    reference: ArrayRecord | None = None
    transfer_dtype: str = "float32"
    max_update_norm: float = 0.0
    _prescreened: set[int] = frozenset()  # type: ignore[assignment]  # ids of replies screened before a DP wrapper
    _sent_messages: list[Message] = []  # the last instructions sent (configure_train / configure_evaluate)
    passthrough: frozenset[str] = frozenset()  # reply ArrayRecords the strategy checks itself (SCAFFOLD's dc_i)

    def __init__(
        self, *args: object, transfer_dtype: str = "float32", max_update_norm: float = 0.0,
        sites: SiteRegistry | None = None, **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.transfer_dtype = transfer_dtype
        self.max_update_norm = max_update_norm
        self.sites = sites if sites is not None else SiteRegistry()  # bindings, declared sizes, round problems

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
        for msg in messages:  # with site keys, each node is told whose key it holds (its ClientApp refuses a mismatch)
            site = self.sites.node_sites.get(msg.metadata.dst_node_id)
            if site and P.CONFIG in msg.content.config_records:
                content = RecordDict(dict(msg.content.items()))  # the same arrays, a config of its own
                content[P.CONFIG] = ConfigRecord({**msg.content[P.CONFIG], P.EXPECTED_SITE: site})
                msg.content = content
        self._sent_messages = messages  # the grid sets their message ids: a SuperLink's error reply names only that id
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen every reply against the global model (server/updates.py), aggregate the valid ones, cast back.

        Declined sites (privacy budget spent) were already left out by server.federation.without_declined.
        """
        replies = list(replies)
        if not replies:  # every sampled site declined: the model stays as it is
            return None, None
        valid = self._screened(replies, "train")
        required = min(max(1, getattr(self, "min_train_nodes", 1)), len(replies))  # declined sites left out
        if len(valid) < required:
            raise SiteFailure(
                f"round {server_round}: {len(valid)} valid model update(s), fewer than the {required} required "
                f"(federation.min-train-sites); {self.sites.describe()}"
            )
        if not usable_weights([float(msg.content[P.METRICS][P.NUM_EXAMPLES]) for msg in valid]):
            return None, None  # Flower divides by the total weight: never 0, never NaN (screening makes this unreachable)
        arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
        if arrays is not None and self.reference is not None:
            arrays = self._like_reference(arrays)
            self.reference = arrays
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Screen evaluation replies (counts must add up), require federation.min-evaluate-sites valid ones."""
        valid = self._screened(list(replies), "evaluate")
        required = max(1, getattr(self, "min_evaluate_nodes", 1))
        if len(valid) < required:
            raise SiteFailure(
                f"round {server_round}: {len(valid)} valid evaluation(s), fewer than the "
                f"{required} required (federation.min-evaluate-sites); {self.sites.describe()}"
            )
        return super().aggregate_evaluate(server_round, valid)  # type: ignore[misc]

    def prescreen(self, replies: list[Message]) -> list[Message]:
        """For a central-DP wrapper, which clips replies before this strategy sees them: the error replies as they
        are (the wrapper skips such a round), the valid replies rebuilt, the rest left out (logged, counted)."""
        valid = self._screened(replies, "train")
        errors = [msg for msg in replies if msg.has_error()]
        self._prescreened = {id(msg) for msg in valid + errors}
        return errors + valid

    def _like_reference(self, arrays: ArrayRecord) -> ArrayRecord:
        assert self.reference is not None
        return _cast(arrays, {k: self.reference[k].dtype for k in self.reference.keys()})

    def _screened(self, replies: list[Message], phase: str) -> list[Message]:
        """The replies the server will use, rebuilt from checked parts, in a fixed order (by site).

        Error replies are recorded as failures (a strict-mode data error ends the run); a reply whose
        node, arrays or counts do not pass server/updates.py is recorded as rejected with its reason.
        """
        identities = self.sites.identify(replies)
        kept: list[tuple[str, Message]] = []
        done, self._prescreened = self._prescreened, set()
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent_messages if m.metadata.message_id}
        decoded: dict[str, np.ndarray] | None = None
        for i, msg in enumerate(replies):
            if id(msg) in done:  # screened before a central-DP wrapper clipped it (see prescreen)
                if not msg.has_error():
                    kept.append((str(msg.content[P.SITE][P.SITE_NAME]), msg))
                continue
            if msg.has_error():  # "Node Unavailable" comes from the SuperLink: its instruction names the node
                self.sites.failed(phase, msg, sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id))
                continue
            site, refusal = identities[i]
            try:
                if refusal:
                    raise Rejected(refusal)
                if phase == "train":
                    if self.reference is None:
                        raise Rejected("the server has no global model to check the update against")
                    if decoded is None:  # decoded once per round, only when a reply needs it
                        decoded = {k: np.asarray(self.reference[k].numpy()) for k in self.reference.keys()}
                    content = screen_train(msg.content, self.reference, declared=self.sites.declared.get(site, Declared()),
                                           transfer_dtype=self.transfer_dtype, max_norm=self.max_update_norm,
                                           extra_metrics=self.sites.extra_metrics, decoded=decoded,
                                           passthrough=self.passthrough)
                else:
                    content, announced = screen_evaluate(msg.content, declared=self.sites.declared.get(site, Declared()),
                                                         num_classes=self.sites.num_classes)
                    if announced.train is not None:  # the first declaration stands
                        self.sites.declared.setdefault(site, announced)
            except Rejected as err:
                self.sites.rejected(phase, site, str(err))
                continue
            content[P.SITE] = ConfigRecord({**content[P.SITE], P.SITE_NAME: site})
            msg.content = content
            self.sites.seen[msg.metadata.src_node_id] = site
            kept.append((site, msg))
        return [msg for _, msg in sorted(kept, key=lambda pair: pair[0])]  # arrival order never changes the sum


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

    passthrough = frozenset({P.SCAFFOLD_DELTA})  # dc_i is checked by Scaffold itself (server/scaffold.py)


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
    sites: SiteRegistry | None = None,
) -> Strategy:
    """Instantiate the configured strategy with histofed's metric aggregation (and the run's site registry)."""
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
        sites=sites,
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
        return _screened_first(wrapper)(strategy, z, norm, sampled)
    return _screened_first(wrapper)(
        strategy, z, sampled, initial_clipping_norm=norm, target_clipped_quantile=privacy.target_clipped_quantile,
        clip_norm_lr=privacy.clip_norm_lr, clipped_count_stddev=max(sampled / 20, 1.58 * z))


def _screened_first(wrapper: type[Strategy]) -> type[Strategy]:
    """A Flower central-DP wrapper that lets the wrapped strategy screen the replies before it clips them."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # type: ignore[no-untyped-def]
        return wrapper.aggregate_train(self, server_round, self.strategy.prescreen(list(replies)))

    return type(wrapper.__name__, (wrapper,), {"aggregate_train": aggregate_train, "__doc__": wrapper.__doc__})
