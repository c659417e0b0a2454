"""FedAvg through Flower's strategy: example-weighted mean, keyed validation, dtypes kept."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common import protocol as P
from common.config import FederationConfig
from server.strategy import build_strategy


pytestmark = pytest.mark.usefixtures("task_identity")


def _state(value: float, steps: int) -> dict[str, np.ndarray]:
    return {
        "w": np.full((2, 3), value, dtype=np.float32),
        "bn.running_mean": np.full(3, value * 2, dtype=np.float32),
        "bn.num_batches_tracked": np.array(steps, dtype=np.int64),
    }


def _arrays(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in state.items()})


def _reply(node: int, state: dict[str, np.ndarray], n: int) -> Message:
    instruction = Message(RecordDict({P.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({
        P.ARRAYS: _arrays(state),
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, P.TRAIN_LOSS: 1.0, P.TRAIN_SECONDS: 0.1, P.SKIPPED: 0}),
        P.SITE: ConfigRecord({P.SITE_NAME: f"site-{node}"}),
    })
    return Message(content, reply_to=instruction)


def _strategy():
    recorded = {}

    def train_metrics(records, key):
        recorded["n"] = len(records)
        return MetricRecord({})

    strategy = build_strategy(FederationConfig(), train_metrics=train_metrics, evaluate_metrics=train_metrics)
    strategy.set_reference(_arrays(_state(0.0, 0)))
    return strategy, recorded


def test_fedavg_equals_example_weighted_mean() -> None:
    strategy, _ = _strategy()
    replies = [_reply(1, _state(1.0, 10), 100), _reply(2, _state(4.0, 20), 300), _reply(3, _state(-2.0, 30), 600)]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = (1.0 * 100 + 4.0 * 300 - 2.0 * 600) / 1000
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), expected), rtol=1e-6)
    np.testing.assert_allclose(arrays["bn.running_mean"].numpy(), np.full(3, 2 * expected), rtol=1e-6)
    assert arrays["w"].numpy().dtype == np.float32
    tracked = arrays["bn.num_batches_tracked"].numpy()
    assert tracked.dtype == np.int64  # Flower averages in float64; histofed restores the dtype
    assert int(tracked) == int((10 * 100 + 20 * 300 + 30 * 600) / 1000)


def test_reply_with_wrong_keys_is_dropped_not_misloaded() -> None:
    strategy, recorded = _strategy()
    bad = _state(100.0, 1)
    bad["renamed"] = bad.pop("w")
    replies = [_reply(1, _state(1.0, 1), 100), _reply(2, _state(3.0, 1), 100), _reply(3, bad, 1000)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 2.0))
    assert recorded["n"] == 2


def test_reply_with_wrong_shape_is_dropped() -> None:
    strategy, _ = _strategy()
    bad = _state(100.0, 1)
    bad["w"] = np.zeros((3, 2), dtype=np.float32)
    replies = [_reply(1, _state(1.0, 1), 10), _reply(2, _state(1.0, 1), 10), _reply(3, bad, 10)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 1.0))


def test_no_valid_update_fails_the_round() -> None:
    strategy, _ = _strategy()
    bad = {"other": np.zeros(1, dtype=np.float32)}
    with pytest.raises(RuntimeError, match="0 valid model update"):
        strategy.aggregate_train(1, [_reply(1, bad, 10)])


def test_nan_and_oversized_updates_are_rejected_by_site() -> None:
    from common.config import FederationConfig as FC
    from server.strategy import build_strategy as build

    strategy = build(FC(max_update_norm=10.0, min_train_sites=1, min_evaluate_sites=1, min_available_sites=1),
                     train_metrics=lambda r, k: MetricRecord({}), evaluate_metrics=lambda r, k: MetricRecord({}))
    strategy.set_reference(_arrays(_state(0.0, 0)))
    nan = _state(1.0, 1)
    nan["w"][0, 0] = np.nan
    huge = _state(100.0, 1)  # distance to the global model far beyond 10
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _state(1.0, 1), 10), _reply(2, nan, 10), _reply(3, huge, 10)])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 1.0))


def test_fewer_valid_updates_than_the_minimum_fail_the_round() -> None:
    strategy, _ = _strategy()  # min-train-sites = 2
    bad = {"other": np.zeros(1, dtype=np.float32)}
    with pytest.raises(RuntimeError, match="1 valid model update.s., fewer than the 2 required"):
        strategy.aggregate_train(1, [_reply(1, _state(1.0, 1), 10), _reply(2, bad, 10)])


@pytest.mark.parametrize("name", ["trimmed-mean", "krum"])
def test_robust_strategies_aggregate_and_keep_dtypes(name: str) -> None:
    from common.config import FederationConfig as FC
    from server.strategy import STRATEGIES, build_strategy as build

    strategy = build(FC(strategy=name, min_train_sites=2), train_metrics=lambda r, k: MetricRecord({}),
                     evaluate_metrics=lambda r, k: MetricRecord({}))
    assert isinstance(strategy, STRATEGIES[name][0])
    strategy.set_reference(_arrays(_state(0.0, 0)))
    replies = [_reply(i, _state(v, 1), 10) for i, v in enumerate([1.0, 1.1, 0.9, 1.0, 50.0], start=1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert float(arrays["w"].numpy().mean()) < 5  # the outlier (50) does not drag the result
    assert arrays["bn.num_batches_tracked"].numpy().dtype == np.int64


def test_fedprox_term_pulls_local_weights_towards_the_global_model(tiny_cfg) -> None:
    import torch

    from common.datasets.registry import get_dataset
    from common.model import build_model
    from common.training import train_local

    data = get_dataset("synthetic").load_split(tiny_cfg, 0, "train")
    drift = {}
    for mu in (0.0, 100.0):
        torch.manual_seed(0)
        model = build_model(tiny_cfg.model)
        start = [p.detach().clone() for p in model.parameters()]
        train_local(model, data, tiny_cfg.train, torch.device("cpu"), seed=1, proximal_mu=mu)
        drift[mu] = sum(float(((p.detach() - s) ** 2).sum()) for p, s in zip(model.parameters(), start))
    assert drift[100.0] < drift[0.0]
