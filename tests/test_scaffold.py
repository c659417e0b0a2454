"""SCAFFOLD: the control-variate updates equal a hand computation, c_i survives a fresh process, c travels and is checkpointed."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from torch import nn

from common import protocol as P
from common.config import ConfigError, RunConfig
from common.datasets.splits import ArraySplit
from common.scaffold import ClientState, control_keys, server_update, train_scaffold
from common.training import to_input

pytestmark = pytest.mark.usefixtures("task_identity")
SGD = {"federation.strategy": "scaffold", "train.optimizer": "sgd", "train.momentum": 0, "train.weight-decay": 0}


class TwoParams(nn.Module):
    """Logits [0, w * mean(x) + b]: two parameters, gradients computable by hand."""

    num_classes = 2

    def __init__(self, w: float, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.w * x.mean(dim=(1, 2, 3)) + self.b
        return torch.stack([torch.zeros_like(z), z], dim=1)


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_client_update_equals_hand_computation_on_two_parameters(tmp_path: Path) -> None:
    # Prepare: 4 images in one batch, 3 local epochs = K = 3 full-batch SGD steps (flips do not change a mean)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 6, 6, 3)).astype(np.uint8)
    labels = np.array([0, 1, 1, 0])
    lr, (w0, b0) = 0.5, (0.2, -0.1)
    c = {"w": torch.tensor(0.3), "b": torch.tensor(-0.2)}
    c_i = {"w": torch.tensor(0.1), "b": torch.tensor(0.05)}
    state = ClientState(tmp_path / "site.scaffold.safetensors")
    state.save(federation=7, server_round=1, before={}, after=c_i)  # c_i from the site's round 1
    cfg = RunConfig().override({**SGD, "train.lr": lr, "train.batch-size": 4, "train.local-epochs": 3,
                                "train.num-workers": 0, "train.channels-last": False})
    model = TwoParams(w0, b0)

    # Execute: round 2
    result, delta = train_scaffold(model, ArraySplit(images, labels), cfg, torch.device("cpu"), seed=1,
                                   c_global=c, state=state, federation=7, server_round=2)

    # Assert: y_{k+1} = y_k - lr (g(y_k) - c_i + c);  c_i+ = c_i - c + (x - y_K) / (K lr)
    m = to_input(images, torch.device("cpu"), channels_last=False).double().mean(dim=(1, 2, 3)).tolist()
    w, b = w0, b0
    for _ in range(3):
        s = [_sigmoid(w * mj + b) - yj for mj, yj in zip(m, labels)]
        gw, gb = sum(sj * mj for sj, mj in zip(s, m)) / 4, sum(s) / 4
        w, b = w - lr * (gw - 0.1 + 0.3), b - lr * (gb - 0.05 - 0.2)
    new_w, new_b = 0.1 - 0.3 + (w0 - w) / (3 * lr), 0.05 + 0.2 + (b0 - b) / (3 * lr)
    assert result.steps == 3
    assert model.w.item() == pytest.approx(w, abs=1e-6) and model.b.item() == pytest.approx(b, abs=1e-6)
    assert delta["w"].item() == pytest.approx(new_w - 0.1, abs=1e-5)
    assert delta["b"].item() == pytest.approx(new_b - 0.05, abs=1e-5)
    assert state.load(federation=7, server_round=3)["w"].item() == pytest.approx(new_w, abs=1e-5)
    assert state.load(federation=7, server_round=2)["w"].item() == pytest.approx(0.1)  # round 2 run again: c_i before it


def test_server_update_equals_hand_computation() -> None:
    x = {"w": np.array([1.0, 2.0], np.float32), "bn.running_mean": np.array([0.5], np.float32)}
    mean_y = {"w": np.array([2.0, 0.0], np.float32), "bn.running_mean": np.array([1.5], np.float32)}
    c = {"w": np.array([0.1, 0.1], np.float32)}
    mean_dc = {"w": np.array([0.3, -0.6], np.float32)}
    new_x, new_c = server_update(x, mean_y, c, mean_dc, server_lr=0.5, participation=2 / 3)
    np.testing.assert_allclose(new_x["w"], [1.5, 1.0])  # x + 0.5 (mean y - x)
    np.testing.assert_allclose(new_x["bn.running_mean"], [1.5])  # a buffer: averaged as FedAvg
    np.testing.assert_allclose(new_c["w"], [0.1 + 0.2, 0.1 - 0.4], rtol=1e-6)  # c + |S|/N mean dc


def _strategy(num_sites: int = 3, server_lr: float = 1.0):
    from common.config import FederationConfig
    from server.strategy import build_strategy

    fed = FederationConfig(strategy="scaffold", num_sites=num_sites, scaffold_lr=server_lr)
    strategy = build_strategy(fed, train_metrics=lambda r, k: MetricRecord({}), evaluate_metrics=lambda r, k: MetricRecord({}))
    return strategy


class _Grid:
    def get_node_ids(self):
        return [1, 2]


def _reply(node: int, w: list[float], dc: list[float], n: int) -> Message:
    instruction = Message(RecordDict({P.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict({
        P.ARRAYS: ArrayRecord({"w": Array(np.array(w, np.float32)), "n": Array(np.array(node, np.int64))}),
        P.SCAFFOLD_DELTA: ArrayRecord({"w": Array(np.array(dc, np.float32))}),
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, P.TRAIN_LOSS: 1.0, P.TRAIN_SECONDS: 0.1, P.SKIPPED: 0}),
        P.SITE: ConfigRecord({P.SITE_NAME: f"site-{node}"}),
    })
    return Message(content, reply_to=instruction)


def test_strategy_sends_c_and_aggregates_weights_and_control_variates() -> None:
    strategy = _strategy(num_sites=3)
    start = ArrayRecord({"w": Array(np.zeros(2, np.float32)), "n": Array(np.array(0, np.int64))})
    strategy.set_reference(start)
    messages = list(strategy.configure_train(1, start, ConfigRecord(), _Grid()))
    assert all(P.SCAFFOLD_C in m.content.array_records for m in messages)
    assert len(messages[0].content[P.SCAFFOLD_C]) == 0  # round 1: c = 0
    federation = messages[0].content[P.CONFIG][P.SCAFFOLD_FEDERATION]

    arrays, _ = strategy.aggregate_train(1, [_reply(1, [1.0, 3.0], [0.4, 0.0], 100), _reply(2, [4.0, 0.0], [1.0, -0.9], 300)])

    np.testing.assert_allclose(arrays["w"].numpy(), [3.25, 0.75])  # example-weighted mean of y
    assert arrays["n"].numpy().dtype == np.int64
    np.testing.assert_allclose(strategy.c_global["w"], np.array([0.85, -0.675]) * 2 / 3, rtol=1e-6)
    again = list(strategy.configure_train(2, arrays, ConfigRecord(), _Grid()))
    np.testing.assert_allclose(again[0].content[P.SCAFFOLD_C]["w"].numpy(), strategy.c_global["w"])
    assert again[0].content[P.CONFIG][P.SCAFFOLD_FEDERATION] == federation


def test_a_reply_without_or_with_a_bad_delta_is_dropped() -> None:
    strategy = _strategy()
    start = ArrayRecord({"w": Array(np.zeros(2, np.float32)), "n": Array(np.array(0, np.int64))})
    strategy.set_reference(start)
    list(strategy.configure_train(1, start, ConfigRecord(), _Grid()))
    bad = _reply(3, [100.0, 100.0], [float("nan"), 0.0], 100)
    missing = _reply(4, [100.0, 100.0], [0.0, 0.0], 100)
    del missing.content[P.SCAFFOLD_DELTA]
    arrays, _ = strategy.aggregate_train(1, [_reply(1, [1.0, 1.0], [0.3, 0.3], 100), bad, missing])
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 1.0])
    np.testing.assert_allclose(strategy.c_global["w"], [0.1, 0.1], rtol=1e-6)  # 1 of 3 sites: |S|/N = 1/3


def test_control_variate_and_federation_id_are_checkpointed_and_restored(tmp_path: Path) -> None:
    from common.rundir import RunDirectory
    from server.strategy import restore_strategy_state, strategy_state

    strategy = _strategy()
    strategy.c_global = {"w": np.array([0.5, -1.5], np.float32), "conv.weight": np.ones((2, 1, 3, 3), np.float32)}
    run = RunDirectory.start(RunConfig().override({"output.run-dir": str(tmp_path)}), data_kind="synthetic")
    run.save_strategy_state(strategy_state(strategy))
    fresh = _strategy()
    assert fresh.federation_id["id"][0] != strategy.federation_id["id"][0]
    restore_strategy_state(fresh, run.load_strategy_state())
    assert fresh.c_global.keys() == strategy.c_global.keys()
    assert all(np.array_equal(fresh.c_global[k], strategy.c_global[k]) for k in strategy.c_global)
    assert fresh.federation_id["id"][0] == strategy.federation_id["id"][0]


def test_client_state_survives_a_fresh_process(tmp_path: Path) -> None:
    path = tmp_path / "site-a.scaffold.safetensors"
    after = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    ClientState(path).save(federation=11, server_round=4, before={"w": torch.ones(3, 4)}, after=after)
    out = tmp_path / "read.safetensors"
    code = ("import sys; from pathlib import Path; from safetensors.torch import save_file; "
            "from common.scaffold import ClientState; "
            "save_file(ClientState(Path(sys.argv[1])).load(federation=11, server_round=5), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(path), str(out)], check=True, timeout=120)
    from safetensors.torch import load_file

    read = load_file(str(out))
    assert read.keys() == after.keys() and all(torch.equal(read[k], after[k]) for k in after)


def test_client_state_rules(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    state = ClientState(path)
    assert state.load(federation=1, server_round=1) == {}  # first round: zeros
    state.save(federation=1, server_round=3, before={}, after={"w": torch.ones(2)})
    assert state.load(federation=2, server_round=4) == {}  # another federation's file: not ours
    assert torch.equal(state.load(federation=1, server_round=3)["w"], torch.zeros(2))  # round 3 again: before it
    with pytest.raises(ValueError, match="from round 3, after the server's round 2"):
        state.load(federation=1, server_round=2)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable"):
        state.load(federation=1, server_round=4)


def test_client_app_replies_with_delta_c_for_parameters_only(tiny_cfg, tmp_path: Path) -> None:
    from client.app import train
    from common.model import build_model
    from common.fedbn import norm_keys
    from common.site_state import state_path

    cfg = tiny_cfg.override({**SGD, "train.lr": 0.05, "output.run-dir": str(tmp_path), "federation.local-norm": True})
    model = build_model(cfg.model)
    msg = Message(RecordDict({P.ARRAYS: ArrayRecord(model.state_dict()), P.SCAFFOLD_C: ArrayRecord(),
                              P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1, P.SCAFFOLD_FEDERATION: 5})}),
                  dst_node_id=7, message_type=MessageType.TRAIN)
    from flwr.app import Context

    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                  run_config=cfg.to_flat())
    reply = train(msg, ctx)
    delta = reply.content[P.SCAFFOLD_DELTA]
    expected = control_keys(model, local_norm=True)
    assert sorted(delta.keys()) == sorted(expected) and not set(expected) & set(norm_keys(model))
    assert any(np.abs(delta[k].numpy()).max() > 0 for k in expected)
    assert state_path(cfg, "synthetic-hospital-0", "scaffold").is_file()


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        ({"federation.strategy": "scafold"}, "'federation.strategy'"),
        ({**SGD, "privacy.mode": "local"}, "privacy.mode='local'"),
        ({**SGD, "privacy.mode": "central-fixed-server"}, "cannot be combined with privacy.mode"),
        ({**SGD, "train.optimizer": "adamw"}, "train.optimizer=sgd"),
        ({**SGD, "train.momentum": 0.9}, "train.momentum=0"),
    ],
)
def test_bad_scaffold_settings_name_the_key(sets: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        RunConfig().override(sets)
    assert fragment in str(err.value) and "\n" not in str(err.value)
