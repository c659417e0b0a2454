"""FedBN: each site reports its personalised model (own norm layers over the global weights) beside the global model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from common import protocol as P
from common.model import build_model
from common.fedbn import local_norm_path, norm_keys
from common.weights import save_state_dict

pytestmark = pytest.mark.usefixtures("task_identity")


def _evaluate(cfg, arrays: ArrayRecord, partition: int) -> dict:
    from client.app import evaluate_site

    msg = Message(RecordDict({P.ARRAYS: arrays, P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1})}),
                  dst_node_id=7, message_type=MessageType.EVALUATE)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": partition, "num-partitions": 2},
                  state=RecordDict(), run_config=cfg.to_flat())
    reply = evaluate_site(msg, ctx)
    return {"metrics": dict(reply.content[P.METRICS]), "record": reply.content}


def test_site_reports_global_and_personalised_counts_and_server_pools_both(tiny_cfg, tmp_path: Path) -> None:
    from server.rounds import pool_replies

    cfg = tiny_cfg.override({"federation.local-norm": True, "output.run-dir": str(tmp_path)})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    arrays = ArrayRecord(model.state_dict())
    before = _evaluate(cfg, arrays, 0)["metrics"]  # no local norm layers kept yet: personalised = global
    assert before[P.PERSONALISED + P.CONFUSION] == before[P.CONFUSION]

    own = {k: v.clone() for k, v in model.state_dict().items() if k in norm_keys(model)}
    for key, value in own.items():  # this site's own statistics: far from the global ones
        if key.endswith("running_mean"):
            value += 3.0
    save_state_dict(own, local_norm_path(cfg, "synthetic-hospital-0"))
    site0, site1 = _evaluate(cfg, arrays, 0), _evaluate(cfg, arrays, 1)

    m0 = site0["metrics"]
    assert m0[P.CONFUSION] == before[P.CONFUSION]  # the global model is evaluated as sent
    assert m0[P.PERSONALISED + P.EVAL_LOSS] != pytest.approx(m0[P.EVAL_LOSS])
    report = pool_replies([site0["record"], site1["record"]], num_classes=2)
    assert sorted(report["personalised"]["sites"]) == sorted(report["sites"]) == ["synthetic-hospital-0",
                                                                                   "synthetic-hospital-1"]
    pers = report["personalised"]["sites"]["synthetic-hospital-0"]
    assert pers["loss"] == pytest.approx(m0[P.PERSONALISED + P.EVAL_LOSS])
    assert report["personalised"]["sites"]["synthetic-hospital-1"]["loss"] == pytest.approx(
        report["sites"]["synthetic-hospital-1"]["loss"])  # site 1 kept nothing: its personalised model is the global
    expected = np.asarray(m0[P.PERSONALISED + P.CONFUSION]) + np.asarray(site1["metrics"][P.PERSONALISED + P.CONFUSION])
    assert report["personalised"]["confusion"] == expected.reshape(2, 2).tolist()


def test_without_fedbn_no_personalised_counts(tiny_cfg) -> None:
    from server.rounds import pool_replies

    got = _evaluate(tiny_cfg, ArrayRecord(build_model(tiny_cfg.model).state_dict()), 0)
    assert not any(k.startswith(P.PERSONALISED) for k in got["metrics"])
    assert "personalised" not in pool_replies([got["record"]], num_classes=2)
