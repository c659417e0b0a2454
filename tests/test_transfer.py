"""Half-precision transfer: floats travel as float16 (bytes halve), integers never change, FedAvg averages in fp32."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from common import protocol as P
from common.config import FederationConfig
from common.model import build_model
from server.strategy import build_strategy
from simulations.bench_federation import wire_bytes

pytestmark = pytest.mark.usefixtures("task_identity")


def _train_reply(cfg, arrays: ArrayRecord) -> ArrayRecord:
    from client.app import train

    msg = Message(RecordDict({P.ARRAYS: arrays, P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1})}),
                  dst_node_id=7, message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                  state=RecordDict(), run_config=cfg.to_flat())
    return train(msg, ctx).content[P.ARRAYS]


def _strategy(dtype: str, strategy: str = "fedavg"):
    noop = lambda records, key: MetricRecord({})  # noqa: E731
    cfg = FederationConfig(transfer_dtype=dtype, strategy=strategy)
    return build_strategy(cfg, train_metrics=noop, evaluate_metrics=noop)


def test_client_reply_in_float16_halves_float_bytes_and_keeps_integers(tiny_cfg) -> None:
    sent = ArrayRecord(build_model(tiny_cfg.model).state_dict())
    full = _train_reply(tiny_cfg, sent)
    half = _train_reply(tiny_cfg.override({"federation.transfer-dtype": "float16"}), sent)
    assert list(half.keys()) == list(full.keys())
    floats = [k for k in full.keys() if full[k].dtype == "float32"]
    ints = [k for k in full.keys() if full[k].dtype == "int64"]
    assert floats and ints  # the tiny model has both (BatchNorm's num_batches_tracked)
    for key in floats:
        assert half[key].dtype == "float16" and half[key].numpy().nbytes * 2 == full[key].numpy().nbytes
    for key in ints:
        assert half[key].dtype == "int64"
    assert sum(half[k].numpy().nbytes for k in floats) * 2 == sum(full[k].numpy().nbytes for k in floats)
    assert wire_bytes(half) < 0.6 * wire_bytes(full)  # tiny arrays: per-array metadata is a visible share


def test_server_sends_float16_but_keeps_float32_master_weights() -> None:
    class Grid:
        def get_node_ids(self) -> list[int]:
            return [1, 2]

    master = ArrayRecord({"w": Array(np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)),
                          "bn.num_batches_tracked": Array(np.array(5, dtype=np.int64))})
    strategy = _strategy("float16")
    strategy.set_reference(master)
    for configure in (strategy.configure_train, strategy.configure_evaluate):
        messages = list(configure(1, master, ConfigRecord(), Grid()))
        assert len(messages) == 2
        sent = messages[0].content[P.ARRAYS]
        assert sent["w"].dtype == "float16" and sent["bn.num_batches_tracked"].dtype == "int64"
    assert strategy.reference["w"].dtype == "float32" and master["w"].dtype == "float32"
    assert _strategy("float32").wire_arrays(master) is master  # the default sends the master record as is

    adam = _strategy("float16", strategy="fedadam")  # FedAdam keeps the arrays it sent as its server state
    adam.set_reference(master)
    sent = list(adam.configure_train(1, master, ConfigRecord(), Grid()))[0].content[P.ARRAYS]
    assert sent["w"].dtype == "float16" and adam.current_arrays["w"].dtype == np.float32


def test_float16_replies_are_averaged_in_float32() -> None:
    def reply(node: int, value: float, n: int) -> Message:
        instruction = Message(RecordDict({P.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
        content = RecordDict({
            P.ARRAYS: ArrayRecord({"w": Array(np.full(4, value, dtype=np.float16)),
                                   "bn.num_batches_tracked": Array(np.array(10 * node, dtype=np.int64))}),
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, P.TRAIN_LOSS: 1.0, P.TRAIN_SECONDS: 0.1, P.SKIPPED: 0}),
            P.SITE: ConfigRecord({P.SITE_NAME: f"site-{node}"}),
        })
        return Message(content, reply_to=instruction)

    strategy = _strategy("float16")
    strategy.set_reference(ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32)),
                                        "bn.num_batches_tracked": Array(np.array(0, dtype=np.int64))}))
    arrays, _ = strategy.aggregate_train(1, [reply(1, 1000.0, 100), reply(2, 1001.0, 200)])
    got = arrays["w"].numpy()
    exact = (1000.0 * 100 + 1001.0 * 200) / 300  # 1000.667: between two float16 neighbours (spacing 0.5)
    in_half = np.float16(1000.0) * np.float16(1 / 3) + np.float16(1001.0) * np.float16(2 / 3)
    assert abs(float(in_half) - exact) > 0.1  # averaging in float16 would visibly miss
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np.full(4, exact), rtol=1e-6)
    assert arrays["bn.num_batches_tracked"].numpy().dtype == np.int64
    assert strategy.reference["w"].dtype == "float32"
