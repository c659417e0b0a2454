"""Crafted train replies (hypothesis) mixed with honest ones: the round never crashes and the model is the honest replies' aggregate.

Shared by the suite (tests/test_fuzz_updates.py, a bounded number of cases) and the benchmark
(simulations/bench_fuzz.py, ≥ 10,000 cases). Every crafted reply carries at least one defect
that an honest ClientApp never produces (a wrong dtype, shape or key, a non-finite or
out-of-range value, a forged array header, an update beyond max-update-norm, a bad
num-examples, malformed metrics, a false identity...), on top of random other content.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from hypothesis import strategies as st

from common import protocol as P
from common.config import FederationConfig
from server.sites import SiteRegistry
from server.strategy import build_strategy
from server.updates import Declared

REFERENCE = {
    "w": np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(2, 3),
    "b": np.array([0.5, -0.25, 0.125], dtype=np.float32),
    "bn.num_batches_tracked": np.array(5, dtype=np.int64),
}
FLOATING = ("w", "b")
MAX_NORM = 10.0
ODD_DTYPES = ("float64", "float16", "int64", "int32", "uint8", "bool", "complex64", "<U3", "S3")


def _identity() -> None:
    """Flower Messages need a task identity outside a running task (the ServerApp process has one)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        if getattr(TaskIdentity, attr, None) is None:
            setattr(TaskIdentity, attr, 1)


@dataclass
class Case:
    """One round: honest replies, crafted ones, and the server's settings."""

    transfer: str
    max_norm: float
    bound: bool  # site keys known (deployment): node ids are bound to sites
    honest: list[dict[str, Any]]
    crafted: list[dict[str, Any]]
    declared: dict[str, int] = field(default_factory=dict)
    defects: list[str] = field(default_factory=list)


def _npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def _honest_arrays(draw: st.DrawFn, transfer: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, ref in REFERENCE.items():
        if key in FLOATING:
            step = np.asarray(draw(st.lists(st.floats(-0.375, 0.375, width=32), min_size=ref.size, max_size=ref.size)),
                              dtype=np.float32).reshape(ref.shape)
            out[key] = (ref + step).astype(transfer)
        else:
            out[key] = np.array(int(ref) + draw(st.integers(0, 3)), dtype=np.int64)
    return out


# ---- defects: each returns the name of what it broke; `spec` is a crafted reply's plain description
def _wrong_dtype(draw: st.DrawFn, spec: dict, case: Case) -> str:
    key = draw(st.sampled_from(list(REFERENCE)))
    allowed = {str(REFERENCE[key].dtype)} | ({"float16"} if key in FLOATING and case.transfer == "float16" else set())
    dtype = draw(st.sampled_from([d for d in ODD_DTYPES if d not in allowed]))
    shape = REFERENCE[key].shape
    if dtype in ("<U3", "S3"):
        value = np.full(shape, draw(st.sampled_from(["nan", "inf", "1e9"])), dtype=dtype)
    else:
        big = draw(st.sampled_from([1e39, 1e18, 1.0, -1.0, 0.0]))
        with np.errstate(over="ignore", invalid="ignore"):
            value = np.full(shape, big).astype(dtype) if dtype != "bool" else np.ones(shape, dtype=bool)
    spec["arrays"][key] = value
    return f"dtype {dtype} in {key}"


def _forged_header(draw: st.DrawFn, spec: dict, case: Case) -> str:
    key = draw(st.sampled_from(list(REFERENCE)))
    ref = REFERENCE[key]
    payload = draw(st.sampled_from(["other-dtype", "other-shape", "garbage", "empty", "object", "stype"]))
    data = {"other-dtype": lambda: _npy(np.full(ref.shape, 1e39)),
            "other-shape": lambda: _npy(np.zeros((7,), dtype=ref.dtype)),
            "garbage": lambda: bytes(draw(st.binary(min_size=0, max_size=64))),
            "empty": lambda: b"",
            "object": lambda: _npy(np.zeros(ref.shape, dtype=ref.dtype)),
            "stype": lambda: _npy(np.zeros(ref.shape, dtype=ref.dtype))}[payload]()
    dtype = "object" if payload == "object" else str(ref.dtype)
    stype = "torch.Tensor" if payload == "stype" else "numpy.ndarray"
    if payload == "object":  # the same header length, so np.load reads it: then refuses objects (no pickle)
        data = data.replace(f"'{ref.dtype.str}'".encode(), b"'|O' ", 1)
    spec["raw"][key] = Array(dtype=dtype, shape=tuple(ref.shape), stype=stype, data=data)
    return f"forged {payload} in {key}"


def _wrong_shape(draw: st.DrawFn, spec: dict, case: Case) -> str:
    key = draw(st.sampled_from(list(REFERENCE)))
    ref = REFERENCE[key]
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple).filter(lambda s: s != ref.shape))
    spec["arrays"][key] = np.zeros(shape, dtype=REFERENCE[key].dtype)
    return f"shape {shape} in {key}"


def _keys(draw: st.DrawFn, spec: dict, case: Case) -> str:
    how = draw(st.sampled_from(["missing", "extra", "renamed"]))
    key = draw(st.sampled_from(list(REFERENCE)))
    if how == "missing":
        spec["arrays"].pop(key, None)
        spec["raw"].pop(key, None)
    elif how == "extra":
        spec["arrays"]["evil"] = np.zeros(3, dtype=np.float32)
    else:
        spec["arrays"][key + ".x"] = spec["arrays"].pop(key, REFERENCE[key])
    return f"{how} key {key}"


def _non_finite(draw: st.DrawFn, spec: dict, case: Case) -> str:
    key = draw(st.sampled_from(FLOATING))
    base = spec["arrays"].get(key)
    if base is None or base.dtype.kind != "f" or base.shape != REFERENCE[key].shape:
        base = REFERENCE[key]
    with np.errstate(over="ignore", invalid="ignore"):
        value = base.astype(case.transfer)
    value.flat[draw(st.integers(0, value.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    spec["arrays"][key] = value
    return f"non-finite {key}"


def _too_far(draw: st.DrawFn, spec: dict, case: Case) -> str:
    key = draw(st.sampled_from(list(REFERENCE)))
    if key in FLOATING:
        shift = draw(st.floats(MAX_NORM + 1, 6e4))  # finite even in float16
        spec["arrays"][key] = (REFERENCE[key] + shift).astype(case.transfer)
    else:
        spec["arrays"][key] = np.array(int(REFERENCE[key]) + draw(st.integers(int(MAX_NORM) + 1, 10**5)), dtype=np.int64)
    return f"norm beyond {MAX_NORM:g} via {key}"


def _integer_range(draw: st.DrawFn, spec: dict, case: Case) -> str:
    value = draw(st.sampled_from([-1, -(2**62), 10**18, int(REFERENCE["bn.num_batches_tracked"]) + 10**6 + 1]))
    spec["arrays"]["bn.num_batches_tracked"] = np.array(value, dtype=np.int64)
    return f"integer buffer {value}"


def _num_examples(draw: st.DrawFn, spec: dict, case: Case) -> str:
    options: list[Any] = [float("nan"), float("inf"), -5, 0, -(10**12), 10**12, 1e12, 3.5, 10.0, 2**70, [1, 2], 10**9 + 1]
    if spec["claim"] in case.declared:
        options.append(case.declared[spec["claim"]] + draw(st.integers(1, 1000)))
    value = draw(st.sampled_from(options))
    spec["metrics"][P.NUM_EXAMPLES] = value
    return f"num-examples {value!r}"


def _metrics(draw: st.DrawFn, spec: dict, case: Case) -> str:
    how = draw(st.sampled_from(["drop", "extra", "loss-nan", "loss-negative", "skipped-float", "second-record",
                                "renamed-record", "list-value"]))
    if how == "drop":
        del spec["metrics"][draw(st.sampled_from([P.TRAIN_LOSS, P.NUM_EXAMPLES, P.TRAIN_SECONDS, P.SKIPPED]))]
    elif how == "extra":
        spec["metrics"]["evil"] = 1.0
    elif how == "loss-nan":
        spec["metrics"][P.TRAIN_LOSS] = float("nan")
    elif how == "loss-negative":
        spec["metrics"][P.TRAIN_LOSS] = -1.0
    elif how == "skipped-float":
        spec["metrics"][P.SKIPPED] = 0.5
    elif how == "list-value":
        spec["metrics"][P.TRAIN_SECONDS] = [1.0, 2.0]
    else:
        spec["records"] = how
    return f"metrics {how}"


def _records(draw: st.DrawFn, spec: dict, case: Case) -> str:
    spec["records"] = draw(st.sampled_from(["no-arrays", "two-arrays", "arrays-renamed", "no-metrics"]))
    return spec["records"]


def _identity_defect(draw: st.DrawFn, spec: dict, case: Case) -> str:
    names = [h["site"] for h in case.honest]
    if case.bound:  # a registered hostile node posing as an honest site, or an unregistered node
        how = draw(st.sampled_from(["pose", "unregistered"]))
        spec["claim"] = draw(st.sampled_from(names))
        if how == "unregistered":
            spec["bound"] = None
        return f"identity {how} as {spec['claim']}"
    spec["claim"] = draw(st.sampled_from(["", 5, "../etc", "a b", None]))
    return f"identity claim {spec['claim']!r}"


DEFECTS: dict[str, Callable[[st.DrawFn, dict, Case], str]] = {
    "dtype": _wrong_dtype, "forged": _forged_header, "shape": _wrong_shape, "keys": _keys,
    "non-finite": _non_finite, "too-far": _too_far, "integer": _integer_range, "num-examples": _num_examples,
    "metrics": _metrics, "records": _records, "identity": _identity_defect,
}


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A round of 1-4 honest replies and 1-4 crafted or failed ones."""
    case = Case(transfer=draw(st.sampled_from(["float32", "float16"])), max_norm=draw(st.sampled_from([0.0, MAX_NORM])),
                bound=draw(st.booleans()), honest=[], crafted=[])
    for i in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 500))
        site = f"h-{i}"
        case.honest.append({"node": i + 1, "site": site, "arrays": _honest_arrays(draw, case.transfer), "n": n})
        if draw(st.booleans()):
            case.declared[site] = n + draw(st.integers(0, 50))
    for j in range(draw(st.integers(1, 4))):
        node = 100 + j
        if draw(st.integers(0, 5)) == 0:  # a site whose ClientApp failed: Flower's error reply
            case.crafted.append({"node": node, "error": draw(st.text(max_size=30))})
            continue
        spec = {"node": node, "claim": f"x-{j}", "bound": f"x-{j}", "arrays": _honest_arrays(draw, case.transfer),
                "raw": {}, "metrics": {P.NUM_EXAMPLES: draw(st.integers(1, 500)), P.TRAIN_LOSS: 0.5,
                                       P.TRAIN_SECONDS: 0.1, P.SKIPPED: 0}, "records": ""}
        usable = [name for name in DEFECTS if name != "too-far" or case.max_norm > 0]
        count = draw(st.sampled_from([1, 1, 1, 2, 3]))  # mostly one defect: each check must hold on its own
        for name in draw(st.lists(st.sampled_from(usable), min_size=count, max_size=count, unique=True)):
            case.defects.append(DEFECTS[name](draw, spec, case))
        case.crafted.append(spec)
    return case


def _message(node: int, content: RecordDict | None = None, error: str | None = None) -> Message:
    instruction = Message(RecordDict({P.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=MessageType.TRAIN)
    if error is not None:
        return Message(Error(code=2, reason=error), reply_to=instruction)
    return Message(content, reply_to=instruction)


def _honest_message(h: dict[str, Any]) -> Message:
    content = RecordDict({
        P.ARRAYS: ArrayRecord({k: Array(v) for k, v in h["arrays"].items()}),
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: h["n"], P.TRAIN_LOSS: 0.5, P.TRAIN_SECONDS: 0.1, P.SKIPPED: 0}),
        P.SITE: ConfigRecord({P.SITE_NAME: h["site"], P.DATA_KIND: "synthetic"}),
    })
    return _message(h["node"], content)


def _crafted_message(spec: dict[str, Any]) -> Message:
    if "error" in spec:
        return _message(spec["node"], error=spec["error"])
    arrays = ArrayRecord({**{k: Array(v) for k, v in spec["arrays"].items()}, **spec["raw"]})
    metrics = MetricRecord(spec["metrics"])
    site = ConfigRecord({P.SITE_NAME: spec["claim"]} if spec["claim"] is not None else {})
    records: dict[str, Any] = {P.ARRAYS: arrays, P.METRICS: metrics, P.SITE: site}
    how = spec["records"]
    if how == "no-arrays":
        del records[P.ARRAYS]
    elif how == "two-arrays":
        records["more"] = ArrayRecord({"w": Array(REFERENCE["w"])})
    elif how == "arrays-renamed":
        records["weights"] = records.pop(P.ARRAYS)
    elif how == "no-metrics":
        del records[P.METRICS]
    elif how == "second-record":
        records["more-metrics"] = MetricRecord({"x": 1.0})
    elif how == "renamed-record":
        records["stats"] = records.pop(P.METRICS)
    return _message(spec["node"], RecordDict(records))


def _strategy(case: Case, bound: dict[int, str]):
    registry = SiteRegistry(node_sites=dict(bound), declared={s: Declared(train=n) for s, n in case.declared.items()})
    cfg = FederationConfig(min_train_sites=1, min_evaluate_sites=1, min_available_sites=1, transfer_dtype=case.transfer,
                           max_update_norm=case.max_norm)
    strategy = build_strategy(cfg, train_metrics=lambda records, key: MetricRecord({}),
                              evaluate_metrics=lambda records, key: MetricRecord({}), sites=registry)
    strategy.set_reference(ArrayRecord({k: Array(v) for k, v in REFERENCE.items()}))
    return strategy


def check_case(case: Case) -> None:
    """The property: aggregating honest + crafted replies equals aggregating the honest ones alone, no exception."""
    _identity()
    bound: dict[int, str] = {}
    if case.bound:
        bound = {h["node"]: h["site"] for h in case.honest}
        bound.update({c["node"]: c["bound"] for c in case.crafted if c.get("bound")})
    mixed = [_honest_message(h) for h in case.honest] + [_crafted_message(c) for c in case.crafted]
    order = np.random.default_rng(len(case.defects)).permutation(len(mixed))  # arrival order is arbitrary
    got, _ = _strategy(case, bound).aggregate_train(1, [mixed[i] for i in order])
    want, _ = _strategy(case, bound).aggregate_train(1, [_honest_message(h) for h in case.honest])
    assert got is not None and want is not None
    assert list(got.keys()) == list(want.keys())
    for key in want.keys():
        a, b = got[key].numpy(), want[key].numpy()
        assert a.dtype == b.dtype == REFERENCE[key].dtype, (key, a.dtype, b.dtype, case.defects)
        assert np.array_equal(a, b), (key, a, b, case.defects)
