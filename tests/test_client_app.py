"""The ClientApp on real Flower messages (no engine): weights by key, counts for pooled metrics."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from common import protocol as P
from common.model import build_model
from common.weights import WeightMismatchError


pytestmark = pytest.mark.usefixtures("task_identity")


def _call(fn, cfg, arrays: ArrayRecord, message_type: str, partition: int = 1) -> Message:
    msg = Message(
        RecordDict({P.ARRAYS: arrays, P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1})}),
        dst_node_id=7, message_type=message_type,
    )
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": partition, "num-partitions": 2},
                  state=RecordDict(), run_config=cfg.to_flat())
    return fn(msg, ctx)


def test_train_replies_with_every_weight_by_key(tiny_cfg) -> None:
    from client.app import train

    model = build_model(tiny_cfg.model)
    sent = ArrayRecord(model.state_dict())
    reply = _call(train, tiny_cfg, sent, MessageType.TRAIN)
    got = reply.content[P.ARRAYS]
    assert list(got.keys()) == list(sent.keys())
    assert all(got[k].dtype == sent[k].dtype for k in sent.keys())
    changed = [k for k in sent.keys() if not np.array_equal(got[k].numpy(), sent[k].numpy())]
    assert changed, "training changed no weight"
    metrics = reply.content[P.METRICS]
    assert metrics[P.NUM_EXAMPLES] == tiny_cfg.data.train_per_site and metrics[P.TRAIN_LOSS] > 0
    assert reply.content[P.SITE][P.SITE_NAME] == "synthetic-hospital-1"


def test_evaluate_replies_with_counts(tiny_cfg) -> None:
    from client.app import evaluate_site

    reply = _call(evaluate_site, tiny_cfg, ArrayRecord(build_model(tiny_cfg.model).state_dict()), MessageType.EVALUATE)
    metrics = dict(reply.content[P.METRICS])
    confusion, hist = P.decode_counts(metrics, 2)
    assert confusion.sum() == tiny_cfg.data.test_per_site == metrics[P.NUM_EXAMPLES]
    assert hist[1].sum() == tiny_cfg.data.test_per_site  # every example in class 1's pos/neg histograms


def test_mismatched_global_weights_are_an_error(tiny_cfg) -> None:
    from client.app import train

    other = tiny_cfg.override({"model.hidden-size": 12})
    with pytest.raises(WeightMismatchError, match="shape mismatch"):
        _call(train, tiny_cfg, ArrayRecord(build_model(other.model).state_dict()), MessageType.TRAIN)


def test_node_count_must_match_configured_sites(tiny_cfg) -> None:
    from client.site import resolve_site

    with pytest.raises(ValueError, match="3 nodes but 2 training sites"):
        resolve_site({"partition-id": 0, "num-partitions": 3}, ["a", "b"])
    assert resolve_site({"site": "b"}, ["a", "b"]).index == 1


def test_a_node_with_its_own_data_root_is_one_whole_hospital(tiny_cfg, tmp_path) -> None:
    from client.site import node_view
    from common.datasets.registry import get_dataset

    root = get_dataset("breakhis").write_fixture(tmp_path / "hospital-a", size=(70, 46))
    run_cfg = tiny_cfg.override({"data.dataset": "breakhis", "federation.num-sites": 2})
    node_cfg = {"site": "hospital-a", "data.root": str(root), "data.cache-dir": str(tmp_path / "cache")}
    cfg, site = node_view(run_cfg, node_cfg)
    assert site.index == 0 and site.name == "hospital-a"
    assert cfg.data.root == str(root) and cfg.federation.num_sites == 1
    data = get_dataset("breakhis").load_split(cfg, site.index, "train")
    assert len(data) > 0
