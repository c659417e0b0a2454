"""DP through Flower: weights by key with DP and without, declines and the budget policy, central DP, privacy report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping, DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping, DifferentialPrivacyServerSideFixedClipping,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from common import protocol as P
from common.config import RunConfig
from common.model import build_model_for
from common.privacy.accounting import plan_central
from common.privacy.monitor import DECLINED, EPSILON, PrivacyBudgetStop, PrivacyMonitor
from common.weights import load_weights
from server.federation import without_declined
from server.sites import SiteRegistry
from server.strategy import build_strategy, wrap_central_dp
from server.updates import PRIVACY_METRICS

pytestmark = [pytest.mark.usefixtures("task_identity"), pytest.mark.filterwarnings("ignore::UserWarning")]
FLOWER_SIM = str(Path(sys.executable).parent / "flower-sim")


def _train_message(arrays: ArrayRecord, config: dict) -> Message:
    return Message(RecordDict({P.ARRAYS: arrays, P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1, **config})}),
                   dst_node_id=7, message_type=MessageType.TRAIN)


def _through_client_app(cfg: RunConfig, msg: Message, partition: int) -> Message:
    """The ClientApp as Flower calls it (mods included) for one simulated site."""
    from client.app import app

    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": partition, "num-partitions": 2},
                  state=RecordDict(), run_config=cfg.to_flat())
    return app(msg, ctx)


def _strategy(cfg: RunConfig, initial: ArrayRecord, recorded: dict):
    def train_metrics(records, key):
        recorded["sites"] = [r[P.SITE][P.SITE_NAME] for r in records]
        return MetricRecord({})

    strategy = build_strategy(cfg.federation, train_metrics=train_metrics, evaluate_metrics=train_metrics,
                              sites=SiteRegistry.for_config(cfg))  # replies carry the privacy mode's fields
    strategy.set_reference(initial)
    return strategy


@pytest.mark.parametrize("mode", ["off", "local", "central-fixed-client", "central-fixed-server",
                                  "central-adaptive-client"])
def test_dp_and_non_dp_runs_exchange_weights_by_key_without_mismatches(tiny_cfg, tmp_path, mode) -> None:
    # Prepare: the server's model and strategy exactly as the ServerApp builds them
    cfg = tiny_cfg.override({"privacy.mode": mode, "privacy.ledger-dir": str(tmp_path), "train.batch-size": 4,
                             "privacy.noise-multiplier": 1.0, "privacy.clipping-norm": 0.5})
    initial = ArrayRecord(build_model_for(cfg.model, cfg.privacy).state_dict())
    recorded: dict = {}
    inner = _strategy(cfg, initial, recorded)
    strategy = wrap_central_dp(inner, plan_central(cfg), cfg.privacy) if mode.startswith("central") else inner
    if mode == "central-fixed-server":
        strategy.current_arrays = initial  # what its configure_train records
    config = {KEY_CLIPPING_NORM: 0.5} if mode.endswith("-client") else {}
    # Execute: two sites train through the ClientApp (and the clipping mod when the mode needs it)
    replies = [_through_client_app(cfg, _train_message(initial, config), partition) for partition in (0, 1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert
    for reply in replies:
        assert not reply.has_error(), reply.error
        assert list(reply.content[P.ARRAYS].keys()) == list(initial.keys())
    assert recorded["sites"] == ["synthetic-hospital-0", "synthetic-hospital-1"]  # no reply rejected
    assert arrays is not None and list(arrays.keys()) == list(initial.keys())
    load_weights(build_model_for(cfg.model, cfg.privacy), arrays.to_torch_state_dict())  # strict, by key
    dp = mode != "off"
    assert (EPSILON in replies[0].content[P.METRICS]) == (mode == "local")
    assert any("running_mean" in k for k in initial.keys()) != dp  # BatchNorm only without DP
    if mode == "central-fixed-client":  # the mod clipped each site's update to the norm the wrapper sent
        update = [replies[0].content[P.ARRAYS][k].numpy() - initial[k].numpy() for k in initial.keys()]
        assert np.sqrt(sum(float((u.astype(np.float64) ** 2).sum()) for u in update)) <= 0.5 * (1 + 1e-3)


def _reply(node: int, arrays: ArrayRecord, n: int, declined: str = "", eps: float = 1.0) -> Message:
    instruction = Message(RecordDict({P.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    site = {P.SITE_NAME: f"site-{node}", **({DECLINED: declined} if declined else {})}
    dp = {**{k: 0.0 for k in PRIVACY_METRICS}, EPSILON: eps}  # the fields a DP-SGD site reports
    content = RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, P.TRAIN_LOSS: 1.0, P.TRAIN_SECONDS: 0.1,
                                                   P.SKIPPED: 0, **dp}), P.SITE: ConfigRecord(site)})
    if not declined:
        content[P.ARRAYS] = arrays
    return Message(content, reply_to=instruction)


@pytest.mark.parametrize("policy", ["skip-site", "stop"])
def test_a_declining_site_is_dropped_or_stops_the_run_per_config(tiny_cfg, policy) -> None:
    # Prepare
    cfg = tiny_cfg.override({"privacy.mode": "local", "privacy.on-budget-exhausted": policy, "federation.num-sites": 3})
    initial = ArrayRecord(build_model_for(cfg.model, cfg.privacy).state_dict())
    recorded: dict = {}
    strategy = _strategy(cfg, initial, recorded)
    monitor = PrivacyMonitor(cfg)
    replies = [_reply(1, initial, 10), _reply(2, initial, 10), _reply(3, initial, 0, "site site-3 declines round 4: "
                                                                              "privacy budget exhausted", eps=7.9)]
    # Execute / Assert
    if policy == "stop":
        with pytest.raises(PrivacyBudgetStop, match="site-3 declines round 4.*on-budget-exhausted=stop"):
            strategy.aggregate_train(4, without_declined(4, replies, monitor))
        assert "site-3" in monitor.report()["stopped"]
        return
    arrays, _ = strategy.aggregate_train(4, without_declined(4, replies, monitor))
    assert arrays is not None and recorded["sites"] == ["site-1", "site-2"]
    entries = monitor.end_round(4)
    assert entries["site-3"]["declined"].startswith("site site-3 declines") and entries["site-3"]["epsilon"] == 7.9


def test_the_run_stops_when_no_site_can_train_any_more(tiny_cfg) -> None:
    cfg = tiny_cfg.override({"privacy.mode": "local"})
    initial = ArrayRecord(build_model_for(cfg.model, cfg.privacy).state_dict())
    strategy = _strategy(cfg, initial, {})
    monitor = PrivacyMonitor(cfg)
    with pytest.raises(PrivacyBudgetStop, match="no site can train within its privacy budget"):
        strategy.aggregate_train(2, without_declined(
            2, [_reply(1, initial, 0, "budget spent"), _reply(2, initial, 0, "budget spent")], monitor))


def test_a_site_over_budget_declines_through_the_client_app(tiny_cfg, tmp_path) -> None:
    cfg = tiny_cfg.override({"privacy.mode": "local", "privacy.ledger-dir": str(tmp_path), "federation.rounds": 1,
                             "train.batch-size": 4})
    initial = ArrayRecord(build_model_for(cfg.model, cfg.privacy).state_dict())
    first = _through_client_app(cfg, _train_message(initial, {}), 0)  # the one planned round spends the budget
    second = _through_client_app(cfg, _train_message(initial, {}), 0)
    assert P.ARRAYS in first.content and P.ARRAYS not in second.content
    reason = second.content[P.SITE][DECLINED]
    assert "synthetic-hospital-0 declines round 1: privacy budget exhausted" in reason
    assert second.content[P.METRICS][P.NUM_EXAMPLES] == 0
    assert second.content[P.METRICS][EPSILON] == pytest.approx(first.content[P.METRICS][EPSILON])


def test_central_epsilon_per_site_follows_the_gaussian_mechanism_and_the_weights(tiny_cfg) -> None:
    cfg = tiny_cfg.override({"privacy.mode": "central-fixed-server", "privacy.noise-multiplier": 1.2,
                             "federation.rounds": 3, "privacy.target-epsilon": 100})
    monitor = PrivacyMonitor(cfg)
    for _ in range(3):
        monitor.trained({"a": {"num-examples": 100}, "b": {"num-examples": 100}})
        entries = monitor.end_round(1)
    independent = RDPAccountant()
    for _ in range(3):
        independent.step(noise_multiplier=1.2, sample_rate=1.0)
    assert entries["a"]["epsilon"] == pytest.approx(independent.get_epsilon(delta=entries["a"]["delta"]))
    unequal = PrivacyMonitor(cfg)
    unequal.trained({"big": {"num-examples": 300}, "small": {"num-examples": 100}})
    entries = unequal.end_round(1)
    assert entries["big"]["noise-multiplier"] == pytest.approx(1.2 / 1.5) and entries["big"]["epsilon"] > entries["small"]["epsilon"]


def test_central_dp_stops_before_a_round_beyond_the_budget(tiny_cfg) -> None:
    cfg = tiny_cfg.override({"privacy.mode": "central-fixed-client", "privacy.noise-multiplier": 2.0,
                             "privacy.target-epsilon": 4.0, "federation.rounds": 50})
    monitor = PrivacyMonitor(cfg)
    with pytest.raises(PrivacyBudgetStop, match="central DP budget exhausted: site a"):
        for r in range(1, 51):
            monitor.trained({"a": {"num-examples": 10}, "b": {"num-examples": 10}})
            monitor.end_round(r)
            monitor.check_next_round(r)
    assert max(row["epsilon"] for row in monitor.sites.values()) <= 4.0


def test_a_resumed_run_keeps_counting_central_epsilon_from_the_report(tiny_cfg) -> None:
    cfg = tiny_cfg.override({"privacy.mode": "central-fixed-server", "privacy.noise-multiplier": 1.5,
                             "privacy.target-epsilon": 100})
    first = PrivacyMonitor(cfg)
    for r in (1, 2):
        first.trained({"a": {"num-examples": 10}, "b": {"num-examples": 10}})
        first.end_round(r)
    resumed = PrivacyMonitor(cfg)
    resumed.restore(json.loads(json.dumps(first.report())))  # through privacy.json
    for monitor in (first, resumed):
        monitor.trained({"a": {"num-examples": 10}, "b": {"num-examples": 10}})
    assert resumed.end_round(3)["a"]["epsilon"] == pytest.approx(first.end_round(3)["a"]["epsilon"])


@pytest.mark.parametrize("strategy", ["fedadam", "krum", "trimmed-mean"])
def test_central_dp_needs_a_mean_aggregator(tiny_cfg, strategy) -> None:
    from common.errors import ConfigError
    from common.privacy.preflight import preflight

    cfg = tiny_cfg.override({"privacy.mode": "central-fixed-server", "federation.strategy": strategy})
    with pytest.raises(ConfigError, match=f"'federation.strategy': central DP .* fedavg or fedprox .got '{strategy}'"):
        preflight(cfg)


@pytest.mark.parametrize(("mode", "cls"), [
    ("central-fixed-server", DifferentialPrivacyServerSideFixedClipping),
    ("central-fixed-client", DifferentialPrivacyClientSideFixedClipping),
    ("central-adaptive-server", DifferentialPrivacyServerSideAdaptiveClipping),
    ("central-adaptive-client", DifferentialPrivacyClientSideAdaptiveClipping),
])
def test_each_central_mode_selects_flowers_wrapper(tiny_cfg, mode, cls) -> None:
    cfg = tiny_cfg.override({"privacy.mode": mode})  # σ 'auto' for 5 rounds at ε = 8 with 2 hospitals
    plan = plan_central(cfg)
    wrapped = wrap_central_dp(build_strategy(cfg.federation, train_metrics=None, evaluate_metrics=None), plan, cfg.privacy)
    assert isinstance(wrapped, cls) and plan.num_sampled == 2 and plan.delta < 1 / 2  # Flower's, screening first


def test_dp_benchmark_prints_its_figures_at_the_tiny_size(capsys) -> None:
    from simulations import bench_dp

    result = bench_dp.main(["--tiny", "--no-accuracy"])
    out = capsys.readouterr().out
    assert "DP-SGD/normal img/s, fast grouped-conv sampler" in out and result["throughput"]["dp-fast/normal"] > 0
    assert set(result["throughput"]["img-s"]) == {"normal", "gn-no-dp", "dp-fast", "dp-stock", "recipe", "recipe-dp",
                                                  "recipe-cached", "recipe-cached-dp"}  # the fine-tuning recipe too


def _two_site_simulation(tmp_path: Path, rounds: int, *sets: str) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path / "run"
    args = [a for kv in sets for a in ("--set", kv)]
    result = subprocess.run(
        [FLOWER_SIM, "run", "synthetic-tiny", "--sites", "2", "--rounds", str(rounds), "--run-dir", str(run), *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    return run, result


@pytest.mark.slow
def test_a_dp_simulation_completes_and_writes_the_privacy_report(tmp_path: Path) -> None:
    run, result = _two_site_simulation(tmp_path, 1, "privacy.mode=local", "privacy.target-epsilon=8")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((run / "privacy.json").read_text())
    assert report["mode"] == "local" and report["accountant"] == "rdp" and report["data-kind"] == "synthetic"
    assert "DP-SGD" in report["mechanism"] and report["stopped"] is None
    assert sorted(report["sites"]) == ["synthetic-hospital-0", "synthetic-hospital-1"]
    for site in report["sites"].values():
        assert 0 < site["epsilon"] <= 8 and site["noise-multiplier"] > 0 and 0 < site["sample-rate"] <= 1
        assert site["max-grad-norm"] == 1.0 and site["steps"] > 0 and site["delta"] < 1 / 32
        assert [r["round"] for r in site["rounds"]] == [1]
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(lines[1]["privacy"]) == {"synthetic-hospital-0", "synthetic-hospital-1"}
    cfg = RunConfig.from_flat(json.loads((run / "config.json").read_text())["config"])
    load_weights(build_model_for(cfg.model, cfg.privacy, load_pretrained=False), load_file(str(run / "model.safetensors")))
    assert (run / "report" / "epsilon.png").is_file() and (run / "report.html").is_file()
    assert len(list((run / "privacy-ledger").glob("*.json"))) == 2


@pytest.mark.parametrize("mode", ["off", "local"])
def test_fedbn_keeps_normalization_layers_at_the_site(tiny_cfg, tmp_path, mode) -> None:
    # Prepare
    from client.app import _setup
    from common.fedbn import local_norm_path, norm_keys
    from common.weights import read_state_dict

    cfg = tiny_cfg.override({"federation.local-norm": True, "privacy.mode": mode, "privacy.ledger-dir": str(tmp_path),
                             "train.batch-size": 4})
    model = build_model_for(cfg.model, cfg.privacy)
    keys = norm_keys(model)
    initial = ArrayRecord(model.state_dict())
    recorded: dict = {}
    strategy = _strategy(cfg, initial, recorded)
    # Execute: both sites train one round; the server aggregates
    replies = [_through_client_app(cfg, _train_message(initial, {}), p) for p in (0, 1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: norm layers went back as received and the server's stay unchanged; the site kept its trained ones
    assert keys and (any("running_var" in k for k in keys) == (mode == "off"))
    for k in keys:
        assert np.array_equal(replies[0].content[P.ARRAYS][k].numpy(), initial[k].numpy())
        assert np.allclose(arrays[k].numpy(), initial[k].numpy())
    kept = read_state_dict(local_norm_path(cfg, "synthetic-hospital-0"))
    assert sorted(kept) == sorted(keys) and any(not np.allclose(kept[k].numpy(), initial[k].numpy()) for k in keys)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                  run_config=cfg.to_flat())
    _, _, again, _ = _setup(_train_message(arrays, {}), ctx)  # next round: the site's own norm layers come back
    state = again.state_dict()
    assert all(np.allclose(state[k].float().numpy(), kept[k].float().numpy()) for k in keys)


@pytest.mark.slow
def test_a_central_dp_simulation_with_client_side_clipping_completes(tmp_path: Path) -> None:
    run, result = _two_site_simulation(tmp_path, 2, "privacy.mode=central-fixed-client", "privacy.clipping-norm=0.5")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((run / "privacy.json").read_text())
    assert report["mode"] == "central-fixed-client" and report["unit"].startswith("one hospital")
    for site in report["sites"].values():
        assert [r["round"] for r in site["rounds"]] == [1, 2] and 0 < site["epsilon"] <= 8
        assert site["clipping-norm"] == 0.5
    log = (run / "flower.log").read_text()
    assert "fixedclipping_mod: parameters are clipped" in log and "central DP noise" in log
