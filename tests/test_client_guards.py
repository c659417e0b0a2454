"""The ClientApp's side of the hardening: it declares its training-split size, refuses another site's key, marks strict-mode data errors."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from common import protocol as P
from common.model import build_model

pytestmark = pytest.mark.usefixtures("task_identity")


def _call(fn, cfg, message_type: str, node_config: dict, **config) -> Message:
    arrays = ArrayRecord(build_model(cfg.model).state_dict())
    msg = Message(RecordDict({P.ARRAYS: arrays, P.CONFIG: ConfigRecord(config)}), dst_node_id=7, message_type=message_type)
    ctx = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=cfg.to_flat())
    return fn(msg, ctx)


def test_a_site_declares_its_training_split_size_when_it_joins(tiny_cfg) -> None:
    from client.app import evaluate_site

    node = {"partition-id": 0, "num-partitions": 2}
    joining = _call(evaluate_site, tiny_cfg, MessageType.EVALUATE, node, **{P.SERVER_ROUND: 0}).content[P.METRICS]
    later = _call(evaluate_site, tiny_cfg, MessageType.EVALUATE, node, **{P.SERVER_ROUND: 3}).content[P.METRICS]
    assert joining[P.TRAIN_EXAMPLES] == tiny_cfg.data.train_per_site and P.TRAIN_EXAMPLES not in later


def test_a_node_holding_another_sites_key_is_refused(tiny_cfg) -> None:
    from client.app import train
    from client.site import SiteRefused

    node = {"site": "synthetic-hospital-0"}
    with pytest.raises(SiteRefused, match=f"{P.REFUSED} its key is registered for site 'synthetic-hospital-1' "
                                          "but it calls itself 'synthetic-hospital-0'"):
        _call(train, tiny_cfg, MessageType.TRAIN, node, **{P.EXPECTED_SITE: "synthetic-hospital-1", P.SERVER_ROUND: 1})
    reply = _call(train, tiny_cfg, MessageType.TRAIN, node, **{P.EXPECTED_SITE: "synthetic-hospital-0", P.SERVER_ROUND: 1})
    assert reply.content[P.SITE][P.SITE_NAME] == "synthetic-hospital-0"


@pytest.mark.parametrize("strict", [True, False])
def test_an_unreadable_image_in_strict_mode_fails_marked_for_the_server(tiny_cfg, tmp_path, strict: bool) -> None:
    from client.app import evaluate_site
    from common.datasets.registry import get_dataset

    root = get_dataset("breakhis").write_fixture(tmp_path / "hospital-a", size=(70, 46))
    bad = sorted(root.rglob("*.png"))
    for path in bad:  # every image unreadable: whichever split they fall in
        path.write_bytes(b"not a png")
    cfg = tiny_cfg.override({"data.dataset": "breakhis", "data.strict": strict, "train.num-workers": 0})
    node = {"site": "hospital-a", "data.root": str(root), "data.cache-dir": str(tmp_path / "cache")}
    if not strict:  # skipped and counted
        reply = _call(evaluate_site, cfg, MessageType.EVALUATE, node, **{P.SERVER_ROUND: 2})
        assert reply.content[P.METRICS][P.SKIPPED] > 0
        return
    with pytest.raises(ValueError, match=r"site hospital-a: .* \(data.strict=true\)$"):
        _call(evaluate_site, cfg, MessageType.EVALUATE, node, **{P.SERVER_ROUND: 2})
