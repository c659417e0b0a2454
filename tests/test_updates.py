"""Reply validation (server/updates.py) and the site registry: each hole the probe found, failures and identity per round."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from common import protocol as P
from common.config import FederationConfig
from common.metrics import HIST_BINS
from common.rundir import RunDirectory
from server.sites import SiteFailure, SiteRegistry, read_node_sites, write_node_sites
from server.strategy import build_strategy
from server.updates import Declared, Rejected, check_arrays, check_count, error_text, screen_evaluate, usable_weights

pytestmark = pytest.mark.usefixtures("task_identity")

REF = {"w": np.zeros((2, 3), dtype=np.float32), "bn.num_batches_tracked": np.array(4, dtype=np.int64)}


def _record(state: dict) -> ArrayRecord:
    return ArrayRecord({k: v if isinstance(v, Array) else Array(np.asarray(v)) for k, v in state.items()})


def _state(value: float = 1.0, steps: int = 6, **override) -> dict:
    return {"w": np.full((2, 3), value, dtype=np.float32), "bn.num_batches_tracked": np.array(steps, dtype=np.int64),
            **override}


def _reply(node: int, state: dict, n: object = 10, site: str | None = None, **metrics) -> Message:
    instruction = Message(RecordDict({P.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    values = {P.NUM_EXAMPLES: n, P.TRAIN_LOSS: 1.0, P.TRAIN_SECONDS: 0.1, P.SKIPPED: 0, **metrics}
    return Message(RecordDict({P.ARRAYS: _record(state), P.METRICS: MetricRecord(values),
                               P.SITE: ConfigRecord({P.SITE_NAME: site or f"site-{node}"})}), reply_to=instruction)


def _eval_reply(node: int, n: int = 4, site: str | None = None, **override) -> Message:
    instruction = Message(RecordDict({P.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=MessageType.EVALUATE)
    confusion = [n - 1, 1, 0, 0] if n else [0, 0, 0, 0]
    hist = [0] * (2 * 2 * HIST_BINS)
    hist[HIST_BINS], hist[2 * HIST_BINS] = n, n  # class 0: every example a positive in one bin; class 1: a negative
    values = {P.EVAL_LOSS: 0.5, P.NUM_EXAMPLES: n, P.CONFUSION: confusion, P.SCORE_HIST: hist, P.SKIPPED: 0, **override}
    return Message(RecordDict({P.METRICS: MetricRecord(values), P.SITE: ConfigRecord({P.SITE_NAME: site or f"site-{node}"})}),
                   reply_to=instruction)


def _error(node: int, reason: str) -> Message:
    instruction = Message(RecordDict({P.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(Error(code=2, reason=reason), reply_to=instruction)


def _strategy(registry: SiteRegistry | None = None, **fed):
    cfg = FederationConfig(**{"min_train_sites": 1, "min_evaluate_sites": 1, "min_available_sites": 1, **fed})
    registry = registry or SiteRegistry()
    strategy = build_strategy(cfg, train_metrics=lambda r, k: MetricRecord({}),
                              evaluate_metrics=lambda r, k: MetricRecord({"n": float(len(r))}), sites=registry)
    strategy.set_reference(_record(REF))
    return strategy, registry


@pytest.mark.parametrize("bad, fragment", [
    ({"w": np.full((2, 3), 1e39)}, "dtype of 'w' is float64"),  # finite in float64, Inf after a cast to float32
    ({"w": np.full((2, 3), "nan")}, "dtype of 'w' is <U3"),  # a string array used to slip past the NaN check
    ({"w": np.full((2, 3), 10**18, dtype=np.int64)}, "dtype of 'w' is int64"),  # used to pass max-update-norm
    ({"w": np.full((2, 3), np.nan, dtype=np.float32)}, "non-finite"),
    ({"w": np.zeros((3, 2), dtype=np.float32)}, "shape of 'w'"),
    ({"bn.num_batches_tracked": np.array(-1, dtype=np.int64)}, "integer buffer"),
    ({"bn.num_batches_tracked": np.array(10**18, dtype=np.int64)}, "integer buffer"),
    ({"bn.num_batches_tracked": np.array(4.0)}, "dtype of 'bn.num_batches_tracked' is float64"),
    ({"w": Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"\x93NUMPY garbage")}, "cannot be decoded"),
])
def test_each_crafted_array_is_rejected_naming_the_key(bad: dict, fragment: str) -> None:
    with pytest.raises(Rejected, match=fragment.replace("(", r"\(")):
        check_arrays(_record(REF), _record(_state(**bad)))


def test_a_forged_header_is_judged_by_its_bytes() -> None:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.full((2, 3), 1e39), allow_pickle=False)  # float64 bytes under a float32 header
    forged = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=buffer.getvalue())
    with pytest.raises(Rejected, match="not what its header claims"):
        check_arrays(_record(REF), _record(_state(w=forged)))


def test_float16_is_the_one_wire_exception_and_finiteness_is_checked_after_the_cast() -> None:
    half = _record(_state(w=np.full((2, 3), 0.5, dtype=np.float16)))
    with pytest.raises(Rejected, match="dtype of 'w' is float16"):
        check_arrays(_record(REF), half)  # transfer-dtype float32: no silent cast
    out = check_arrays(_record(REF), half, transfer_dtype="float16")
    assert out["w"].numpy().dtype == np.float32 and out["bn.num_batches_tracked"].numpy().dtype == np.int64
    with pytest.raises(Rejected, match="non-finite"):
        check_arrays(_record(REF), _record(_state(w=np.full((2, 3), np.inf, dtype=np.float16))), transfer_dtype="float16")


def test_max_update_norm_counts_every_array_in_float64() -> None:
    counter_only = _state(value=0.0, steps=4 + 20)  # floats unchanged, the integer counter moved by 20
    with pytest.raises(Rejected, match="update norm 20 exceeds"):
        check_arrays(_record(REF), _record(counter_only), max_norm=10.0)
    assert check_arrays(_record(REF), _record(_state(value=1.0, steps=6)), max_norm=10.0)  # sqrt(6 + 4) ≈ 3.2


@pytest.mark.parametrize("value, declared", [(float("nan"), None), (-5, None), (0, None), (10**12, None), (12.0, None),
                                             (3.5, None), ([1], None), (11, 10)])
def test_num_examples_must_be_a_positive_integer_within_what_was_declared(value: object, declared: int | None) -> None:
    with pytest.raises(Rejected):
        check_count(P.NUM_EXAMPLES, value, limit=declared)
    assert check_count(P.NUM_EXAMPLES, 10, limit=declared) == 10


def test_bad_weights_never_reach_flowers_mean_and_the_round_survives() -> None:
    strategy, registry = _strategy()
    # -10 would bring the total weight to 0 (ZeroDivisionError in Flower), NaN would make the model NaN
    replies = [_reply(1, _state(1.0), 10), _reply(2, _state(9.0), -10), _reply(3, _state(9.0), float("nan")),
               _reply(4, _state(9.0), 10**12)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(arrays["w"].numpy(), np.full((2, 3), 1.0, dtype=np.float32))
    assert sorted(registry.round["rejected"]) == ["site-2", "site-3", "site-4"]
    assert not usable_weights([0.0, 0.0]) and not usable_weights([1.0, float("nan")]) and usable_weights([1.0])


def test_declared_sizes_come_from_the_round_0_evaluation_and_bound_later_replies() -> None:
    strategy, registry = _strategy()
    strategy.aggregate_evaluate(0, [_eval_reply(1, n=4, **{P.TRAIN_EXAMPLES: 50}), _eval_reply(2, n=4)])
    assert registry.declared["site-1"] == Declared(train=50, test=4) and "site-2" not in registry.declared
    registry.end_round(0)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _state(1.0), 51), _reply(2, _state(3.0), 10**6)])
    assert "declared" in registry.round["rejected"]["site-1"]  # 51 > 50
    np.testing.assert_array_equal(arrays["w"].numpy(), np.full((2, 3), 3.0, dtype=np.float32))


def test_evaluation_counts_must_add_up_and_min_evaluate_sites_applies() -> None:
    with pytest.raises(Rejected, match="add up"):
        screen_evaluate(_eval_reply(1, n=4, **{P.CONFUSION: [4, 4, 0, 0]}).content, declared=Declared(), num_classes=2)
    strategy, registry = _strategy(min_evaluate_sites=2)
    with pytest.raises(SiteFailure, match=r"1 valid evaluation\(s\), fewer than the 2 required.*site-2 \(evaluate: "):
        strategy.aggregate_evaluate(1, [_eval_reply(1), _eval_reply(2, **{P.SCORE_HIST: [1, -1]})])


def test_failed_sites_are_named_with_flowers_error_text_and_strict_errors_end_the_run() -> None:
    strategy, registry = _strategy(min_train_sites=2)
    wrapped = "<class 'common.datasets.images.BadImageError'>:<'cannot read image x.png'>"
    with pytest.raises(SiteFailure, match=r"fewer than the 2 required.*failed: node-7 \(train: BadImageError: cannot read"):
        strategy.aggregate_train(1, [_reply(1, _state()), _error(7, wrapped)])
    strict, _ = _strategy(SiteRegistry(strict=True, seen={7: "h-7"}))
    with pytest.raises(SiteFailure, match=r"site h-7 failed \(train\) with data.strict=true: .*x.png \(data.strict=true\)"):
        strict.aggregate_train(1, [_reply(1, _state()), _error(7, wrapped.replace("png'", "png (data.strict=true)'"))])
    sim = "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. Message: boom'>"
    assert error_text(sim) == "boom"


def test_a_node_is_the_site_its_key_belongs_to() -> None:
    strategy, registry = _strategy(SiteRegistry(node_sites={1: "hospital-a", 2: "hospital-b"}))
    replies = [_reply(1, _state(1.0), site="hospital-a"), _reply(2, _state(5.0), site="hospital-a"),
               _reply(3, _state(5.0), site="hospital-c")]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(arrays["w"].numpy(), np.full((2, 3), 1.0, dtype=np.float32))
    assert "holds the key of site 'hospital-b' but calls itself 'hospital-a'" in registry.round["rejected"]["hospital-b"]
    assert "no registered site key" in registry.round["rejected"]["node-3"]
    recorded = registry.end_round(1)
    assert set(recorded["rejected"]) == {"hospital-b", "node-3"} and registry.summary()["sites-rejected"]["node-3"]["rounds"] == [1]


def test_each_node_is_told_whose_key_it_holds(tmp_path) -> None:
    class TwoNodes:  # the part of a Grid that configure_train uses
        def get_node_ids(self):
            return [1, 2]

    run = RunDirectory(tmp_path)
    write_node_sites(run, {1: "hospital-a", 2: "hospital-b"})
    strategy, _ = _strategy(SiteRegistry(node_sites=read_node_sites(run)))
    messages = list(strategy.configure_train(1, _record(REF), ConfigRecord({"x": 1}), TwoNodes()))
    expected = {m.metadata.dst_node_id: m.content[P.CONFIG][P.EXPECTED_SITE] for m in messages}
    assert expected == {1: "hospital-a", 2: "hospital-b"}
    assert messages[0].content[P.ARRAYS] is messages[1].content[P.ARRAYS]  # the model is not copied per node


def test_without_keys_two_replies_claiming_one_site_are_both_rejected() -> None:
    strategy, registry = _strategy()
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _state(1.0)), _reply(2, _state(5.0), site="site-3"),
                                             _reply(3, _state(5.0))])
    np.testing.assert_array_equal(arrays["w"].numpy(), np.full((2, 3), 1.0, dtype=np.float32))
    assert all("2 replies of this round claim site 'site-3'" in why for why in registry.round["rejected"].values())


def test_a_resumed_deployment_keeps_the_sizes_its_sites_declared(tmp_path) -> None:
    from common.config import RunConfig
    from common.rundir import RunDirectory

    cfg = RunConfig().override({"output.run-dir": str(tmp_path)})
    run = RunDirectory.start(cfg, data_kind="synthetic")
    registry = SiteRegistry(node_sites={5: "h-1"}, declared={"h-1": Declared(train=40, test=8)})
    run.write_declared_partition(registry.declarations())
    again = SiteRegistry.for_config(cfg, run)
    assert again.declared == {"h-1": Declared(train=40, test=8)}


def test_a_central_dp_wrapper_sees_only_screened_replies(tiny_cfg) -> None:
    from common.privacy.accounting import plan_central
    from server.strategy import wrap_central_dp

    cfg = tiny_cfg.override({"privacy.mode": "central-fixed-server", "privacy.noise-multiplier": 1.0})
    registry = SiteRegistry.for_config(cfg)
    strategy = build_strategy(cfg.federation, train_metrics=lambda r, k: MetricRecord({}),
                              evaluate_metrics=lambda r, k: MetricRecord({}), sites=registry)
    strategy.set_reference(_record(REF))
    wrapped = wrap_central_dp(strategy, plan_central(cfg), cfg.privacy)
    wrapped.current_arrays = _record(REF)  # what its configure_train records
    crafted = _reply(3, _state(w=np.full((2, 3), "nan")))  # would reach Flower's clipping code unscreened
    arrays, _ = wrapped.aggregate_train(1, [_reply(1, _state(0.5)), crafted, _reply(2, _state(0.5))])
    assert arrays is not None and np.isfinite(arrays["w"].numpy()).all()
    assert "dtype of 'w' is <U3" in registry.round["rejected"]["site-3"]


def test_a_superlinks_node_unavailable_reply_is_named_by_its_instruction() -> None:
    strategy, registry = _strategy(SiteRegistry(node_sites={7: "h-7", 1: "h-1"}))
    instruction = Message(RecordDict({P.CONFIG: ConfigRecord()}), dst_node_id=7, message_type=MessageType.TRAIN)
    instruction.metadata.__dict__["_message_id"] = "instruction-7"  # as the grid sets it when pushing
    strategy._sent_messages = [instruction]
    lost = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=instruction)
    lost.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's own id, not the node's
    strategy.aggregate_train(1, [_reply(1, _state(), site="h-1"), lost])
    assert list(registry.round["failed"]) == ["h-7"]
