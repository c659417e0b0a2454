"""The packed model on the wire: lossless round trip, far fewer Flower objects, malformed packings refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from common import protocol as P
from common.model import build_model
from common.wire import LAYOUT, PACKED, PackingError, pack, unpack


def _content(tiny_cfg) -> RecordDict:
    state = build_model(tiny_cfg.model).state_dict()
    state["half"] = state["classifier.weight"].half()
    return RecordDict({P.ARRAYS: ArrayRecord(state), P.METRICS: MetricRecord({"x": 1.0}),
                       P.CONFIG: ConfigRecord({P.SERVER_ROUND: 2})})


def test_packing_is_lossless_and_keeps_keys_order_dtypes_and_shapes(tiny_cfg) -> None:
    content = _content(tiny_cfg)
    back = unpack(pack(content))
    want, got = content[P.ARRAYS], back[P.ARRAYS]
    assert list(got.keys()) == list(want.keys())
    for key in want.keys():
        a, b = want[key].numpy(), got[key].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), key
    assert dict(back[P.METRICS]) == {"x": 1.0} and back[P.CONFIG][P.SERVER_ROUND] == 2
    assert PACKED not in back and LAYOUT not in back
    assert unpack(content) is content and pack(RecordDict({P.METRICS: MetricRecord({"x": 1.0})})) is not None


def test_a_packed_model_is_a_handful_of_flower_objects(tiny_cfg) -> None:
    content = _content(tiny_cfg)
    plain, packed = len(get_all_nested_objects(content)), len(get_all_nested_objects(pack(content)))
    assert packed <= 10 < 100 < plain  # each object is one HTTP request per hop


@pytest.mark.parametrize("change", ["short", "long", "object"])
def test_a_malformed_packing_is_refused(tiny_cfg, change: str) -> None:
    packed = pack(_content(tiny_cfg))
    layout = json.loads(packed[LAYOUT]["layout"])
    if change == "short":
        layout[0][2] = [layout[0][2][0] * 1000] + layout[0][2][1:]
    elif change == "long":
        layout.pop()
    else:
        layout[0][1] = "|O"
    packed[LAYOUT] = ConfigRecord({"layout": json.dumps(layout)})
    with pytest.raises(PackingError):
        unpack(packed)
