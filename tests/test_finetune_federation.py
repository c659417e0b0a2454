"""Fine-tuning through Flower: only the trainable part travels back and is aggregated (central-DP noise included); the frozen part stays exact."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common import protocol as P
from common.config import RunConfig
from common.model import build_model_for
from common.privacy.accounting import plan_central
from common.trainable import update_keys
from server.sites import SiteRegistry
from server.strategy import build_strategy, wrap_central_dp

pytestmark = [pytest.mark.usefixtures("task_identity"), pytest.mark.filterwarnings("ignore::UserWarning")]


def _client(cfg: RunConfig, msg: Message, partition: int) -> Message:
    from client.app import app

    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": partition, "num-partitions": 2},
                  state=RecordDict(), run_config=cfg.to_flat())
    return app(msg, ctx)


@pytest.mark.parametrize("mode", ["off", "local", "central-fixed-client", "central-fixed-server"])
def test_sites_send_back_only_the_trainable_part_and_the_aggregate_covers_nothing_else(tiny_cfg, tmp_path, mode) -> None:
    # Prepare: the server's split of the global model, as FederationRun makes it
    cfg = tiny_cfg.override({"model.trainable": "head", "privacy.mode": mode, "privacy.ledger-dir": str(tmp_path),
                             "data.cache-dir": str(tmp_path / "cache"), "train.batch-size": 4,
                             "privacy.noise-multiplier": 1.0, "privacy.clipping-norm": 0.5})
    model = build_model_for(cfg.model, cfg.privacy)
    state = model.state_dict()
    keys = update_keys(model, "head")
    trainable = ArrayRecord({k: v for k, v in state.items() if k in keys})
    frozen = ArrayRecord({k: v for k, v in state.items() if k not in keys})
    strategy = build_strategy(cfg.federation, train_metrics=lambda r, k: MetricRecord({}),
                              evaluate_metrics=lambda r, k: MetricRecord({}), sites=SiteRegistry.for_config(cfg))
    strategy.set_reference(trainable)
    if mode.startswith("central"):
        strategy = wrap_central_dp(strategy, plan_central(cfg), cfg.privacy)
        strategy.current_arrays = trainable  # what its configure_train records
    config = {P.SERVER_ROUND: 1, **({KEY_CLIPPING_NORM: 0.5} if mode.endswith("-client") else {})}

    def message() -> Message:
        return Message(RecordDict({P.ARRAYS: trainable, P.FROZEN: frozen, P.CONFIG: ConfigRecord(config)}),
                       dst_node_id=7, message_type=MessageType.TRAIN)

    # Execute
    replies = [_client(cfg, message(), partition) for partition in (0, 1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert
    for reply in replies:
        assert not reply.has_error(), reply.error
        assert list(reply.content[P.ARRAYS].keys()) == list(trainable.keys()) and P.FROZEN not in reply.content
    assert arrays is not None and list(arrays.keys()) == list(trainable.keys())
    assert len(frozen) > len(trainable) and not set(frozen.keys()) & set(arrays.keys())
    moved = [k for k in trainable.keys() if not np.array_equal(arrays[k].numpy(), trainable[k].numpy())]
    assert moved  # the head trained (and, centrally, was noised); the frozen record was never touched
