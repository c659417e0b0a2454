"""Reply validation at the server's boundary: every reply is checked against the global model and what the site declared, never against itself."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common import protocol as P
from common.metrics import HIST_BINS
from common.privacy.monitor import BUDGET, DELTA, EPSILON, MAX_GRAD_NORM, NOISE, SAMPLE_RATE, STEPS, TOTAL_STEPS

MAX_EXAMPLES = 10**9  # num-examples bound before a site has declared its split sizes
INTEGER_GROWTH = 10**6  # how far an integer buffer (BatchNorm num_batches_tracked) may grow in one round
WIRE_EXCEPTION = "float16"  # the one dtype a floating array may travel in besides its own (federation.transfer-dtype)
TRAIN_METRICS = frozenset({P.TRAIN_LOSS, P.NUM_EXAMPLES, P.TRAIN_SECONDS, P.SKIPPED})
PRIVACY_METRICS = frozenset({EPSILON, DELTA, NOISE, SAMPLE_RATE, STEPS, TOTAL_STEPS, MAX_GRAD_NORM, BUDGET})
PATIENT_METRICS = frozenset({P.PATIENTS, P.PATIENT_SCORE_SUM, P.PATIENT_HIST})  # only when the split had patients
EVALUATE_METRICS = frozenset({P.EVAL_LOSS, P.NUM_EXAMPLES, P.CONFUSION, P.SCORE_HIST, P.SKIPPED})


class Rejected(ValueError):
    """A reply the server will not use; the message says why (one line, no site name: the caller adds it)."""


@dataclass(frozen=True)
class Declared:
    """What a site said about its data when it joined (round-0 evaluation): its split sizes."""

    train: int | None = None
    test: int | None = None


def check_arrays(reference: ArrayRecord, got: object, *, transfer_dtype: str = "float32", max_norm: float = 0.0,
                 decoded: Mapping[str, np.ndarray] | None = None) -> ArrayRecord:
    """The reply's arrays cast to the reference dtypes, or Rejected: keys, shapes, dtypes, finiteness, ranges, norm.

    `decoded`: the reference's arrays already decoded (a round screens many replies against one model).
    """
    if not isinstance(got, ArrayRecord):
        raise Rejected(f"no '{P.ARRAYS}' ArrayRecord in the reply")
    missing = [k for k in reference.keys() if k not in got]
    extra = [k for k in got.keys() if k not in reference]
    if missing or extra:
        raise Rejected(f"{len(missing)} missing / {len(extra)} unexpected keys (first '{(missing or extra)[0]}')")
    squares = 0.0
    out: dict[str, Array] = {}
    for key in reference.keys():
        master = np.dtype(reference[key].dtype)
        value = _decode(key, got[key], tuple(reference[key].shape), _allowed(master, transfer_dtype))
        old = decoded[key] if decoded is not None else np.asarray(reference[key].numpy())
        if np.issubdtype(master, np.floating):
            with np.errstate(over="ignore", invalid="ignore"):
                value = value.astype(master)  # float16 → float32 cannot overflow; the check is after the cast anyway
            if not np.isfinite(value).all():
                raise Rejected(f"non-finite values (NaN/Inf) in '{key}' (in {master})")
        elif np.issubdtype(master, np.integer):
            _check_integers(key, value, old)
        squares += float(np.sum((value.astype(np.float64) - old.astype(np.float64)) ** 2))
        out[key] = Array(np.ascontiguousarray(value) if value.ndim else value)
    norm = math.sqrt(squares)
    if not math.isfinite(norm):
        raise Rejected("update norm is not finite")
    if max_norm > 0 and norm > max_norm:
        raise Rejected(f"update norm {norm:.3g} exceeds federation.max-update-norm {max_norm:g}")
    return ArrayRecord(out)


def _allowed(master: np.dtype, transfer_dtype: str) -> tuple[np.dtype, ...]:
    if np.issubdtype(master, np.floating) and transfer_dtype == WIRE_EXCEPTION:
        return (master, np.dtype(WIRE_EXCEPTION))
    return (master,)


def _decode(key: str, array: object, shape: tuple[int, ...], allowed: tuple[np.dtype, ...]) -> np.ndarray:
    """The array's numbers as actually sent (the bytes, not the claimed dtype/shape fields), or Rejected."""
    if not isinstance(array, Array):
        raise Rejected(f"'{key}' is not an Array")
    try:
        claimed = np.dtype(array.dtype)
    except (TypeError, ValueError):
        raise Rejected(f"'{key}' has an unknown dtype {str(array.dtype)[:40]!r}") from None
    if claimed not in allowed:
        raise Rejected(f"dtype of '{key}' is {claimed}, expected {' or '.join(str(d) for d in allowed)}")
    if tuple(array.shape) != shape:
        raise Rejected(f"shape of '{key}' is {tuple(array.shape)}, expected {shape}")
    try:
        value = array.numpy()  # np.load(allow_pickle=False): object arrays cannot come through
    except Exception as err:  # noqa: BLE001 - any undecodable payload is a rejection, not a crash
        raise Rejected(f"'{key}' cannot be decoded ({type(err).__name__})") from None
    if not isinstance(value, np.ndarray) or value.dtype not in allowed or value.shape != shape:
        got = f"{getattr(value, 'dtype', type(value).__name__)} {getattr(value, 'shape', '')}"
        raise Rejected(f"'{key}' holds {got}, not what its header claims")
    return value


def _check_integers(key: str, value: np.ndarray, old: np.ndarray) -> None:
    """Integer buffers (counters) stay within [0, global value + INTEGER_GROWTH]."""
    low = value.min(initial=0) if value.size else 0
    if value.size and (int(low) < 0 or bool((value.astype(np.float64) > old.astype(np.float64) + INTEGER_GROWTH).any())):
        raise Rejected(f"integer buffer '{key}' is outside [0, global + {INTEGER_GROWTH:g}] "
                       f"(min {int(value.min())}, max {int(value.max())})")


def check_count(name: str, value: object, *, limit: int | None, minimum: int = 1) -> int:
    """A count from a reply: a Python int (not bool, not float), minimum ≤ value ≤ limit (else MAX_EXAMPLES)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise Rejected(f"{name} must be an integer (got {type(value).__name__} {_short(value)})")
    bound = MAX_EXAMPLES if limit is None else limit
    if not minimum <= int(value) <= bound:
        which = "the size the site declared when it joined" if limit is not None else "the sanity bound"
        raise Rejected(f"{name} {int(value)} is outside [{minimum}, {bound}] ({which})")
    return int(value)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def single_record(content: RecordDict, kind: str, passthrough: frozenset[str] = frozenset()) -> MetricRecord:
    """The reply's one MetricRecord at P.METRICS (Flower aggregates only replies with exactly one).

    A train reply may also carry the evaluation of the model it received (federation.evaluate-with-train,
    screened as an evaluation reply) and the strategy's own ArrayRecords (`passthrough`, e.g. SCAFFOLD's
    dc_i, which that strategy checks itself).
    """
    extra_metrics = {P.EVALUATION} if kind == "train" else set()
    if P.METRICS not in content.metric_records or set(content.metric_records.keys()) - {P.METRICS} - extra_metrics:
        raise Rejected(f"expected one MetricRecord '{P.METRICS}', got {sorted(content.metric_records.keys())}")
    if kind == "train" and (P.ARRAYS not in content.array_records
                            or set(content.array_records.keys()) - {P.ARRAYS} - set(passthrough)):
        raise Rejected(f"expected one ArrayRecord '{P.ARRAYS}', got {sorted(content.array_records.keys())}")
    return content.metric_records[P.METRICS]


def check_metric_keys(metrics: MetricRecord, expected: frozenset[str], optional: frozenset[str] = frozenset()) -> None:
    """The MetricRecord carries exactly the keys an honest reply carries (Flower needs them equal across replies)."""
    keys = set(metrics.keys())
    missing, extra = expected - keys, keys - expected - optional
    if missing or extra:
        raise Rejected(f"metric keys differ from the protocol: missing {sorted(missing)}, unexpected {sorted(extra)[:5]}")


def check_scalars(metrics: Mapping[str, object], keys: Sequence[str]) -> None:
    """These metrics are finite numbers, counts are non-negative."""
    for key in keys:
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Rejected(f"metric '{key}' must be a finite number (got {_short(value)})")
        if value < 0:
            raise Rejected(f"metric '{key}' must not be negative (got {_short(value)})")


def screen_train(content: RecordDict, reference: ArrayRecord, *, declared: Declared, transfer_dtype: str = "float32",
                 max_norm: float = 0.0, extra_metrics: frozenset[str] = frozenset(),
                 decoded: Mapping[str, np.ndarray] | None = None, passthrough: frozenset[str] = frozenset()) -> RecordDict:
    """A train reply rebuilt from checked parts (arrays in the master dtypes, the strategy's own records as sent), or Rejected."""
    metrics = single_record(content, "train", passthrough)
    check_metric_keys(metrics, TRAIN_METRICS | extra_metrics)
    check_scalars(metrics, [k for k in metrics.keys() if k != P.NUM_EXAMPLES])
    check_count(P.NUM_EXAMPLES, metrics[P.NUM_EXAMPLES], limit=declared.train)
    check_count(P.SKIPPED, metrics[P.SKIPPED], limit=None, minimum=0)
    arrays = check_arrays(reference, content.array_records[P.ARRAYS], transfer_dtype=transfer_dtype, max_norm=max_norm,
                          decoded=decoded)
    out = RecordDict({P.ARRAYS: arrays, P.METRICS: MetricRecord(dict(metrics)), P.SITE: site_record(content)})
    for key in passthrough & set(content.array_records.keys()):
        out[key] = content.array_records[key]
    return out


def screen_evaluate(content: RecordDict, *, declared: Declared, num_classes: int) -> tuple[RecordDict, Declared]:
    """An evaluation reply rebuilt from checked counts, and the sizes it declares (round 0), or Rejected.

    Counts must add up: the confusion matrix sums to num-examples, and each class's score histograms
    (positives + negatives) do too; patient sums must be consistent. A FedBN site's personalised model
    (keys under P.PERSONALISED) is checked the same way.
    """
    metrics = single_record(content, "evaluate")
    prefixes = [""] + ([P.PERSONALISED] if any(k.startswith(P.PERSONALISED) for k in metrics.keys()) else [])
    expected = {p + key for p in prefixes for key in EVALUATE_METRICS}
    optional = {P.TRAIN_EXAMPLES} | {p + key for p in prefixes for key in PATIENT_METRICS}
    check_metric_keys(metrics, frozenset(expected), optional=frozenset(optional))
    clean: dict = {}
    n = skipped = 0
    for prefix in prefixes:
        block, count, lost = _checked_counts(metrics, prefix, declared, num_classes)
        clean.update(block)
        if not prefix:
            n, skipped = count, lost
    announced = declared
    if P.TRAIN_EXAMPLES in metrics:
        announced = Declared(train=check_count(P.TRAIN_EXAMPLES, metrics[P.TRAIN_EXAMPLES], limit=None),
                             test=n + skipped)
    return RecordDict({P.METRICS: MetricRecord(clean), P.SITE: site_record(content)}), announced


def _checked_counts(metrics: MetricRecord, prefix: str, declared: Declared, k: int) -> tuple[dict, int, int]:
    """One model's evaluation counts under `prefix`: (the checked keys, num-examples, skipped images)."""
    check_scalars(metrics, [prefix + P.EVAL_LOSS])
    n = check_count(P.NUM_EXAMPLES, metrics[prefix + P.NUM_EXAMPLES], limit=declared.test, minimum=0)
    skipped = check_count(P.SKIPPED, metrics[prefix + P.SKIPPED], limit=None, minimum=0)
    confusion = _counts(P.CONFUSION, metrics[prefix + P.CONFUSION])
    hist = _counts(P.SCORE_HIST, metrics[prefix + P.SCORE_HIST])
    if confusion.size != k * k or hist.size != k * 2 * HIST_BINS:
        raise Rejected(f"counts do not fit {k} classes (confusion {confusion.size} values, histogram {hist.size}, "
                       f"expected {k * k} and {k * 2 * HIST_BINS})")
    if int(confusion.sum()) != n or (hist.reshape(k, -1).sum(axis=1) != n).any():
        raise Rejected(f"counts do not add up to num-examples {n}")
    keys = [prefix + key for key in EVALUATE_METRICS]
    if prefix + P.PATIENTS in metrics.keys():
        keys += [prefix + key for key in PATIENT_METRICS if prefix + key in metrics.keys()]
        try:
            P.decode_patients({key.removeprefix(prefix): metrics[key] for key in keys})
        except (ValueError, TypeError, KeyError) as err:
            raise Rejected(str(err)) from None
    return {key: metrics[key] for key in keys}, n, skipped


def _counts(name: str, value: object) -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise Rejected(f"metric '{name}' must be a list of integers")
    counts = np.asarray(value, dtype=np.int64) if value else np.zeros(0, dtype=np.int64)
    if (counts < 0).any() or (counts > MAX_EXAMPLES).any():
        raise Rejected(f"metric '{name}' has counts outside [0, {MAX_EXAMPLES}]")
    return counts


def site_record(content: RecordDict) -> ConfigRecord:
    """The reply's site record reduced to its string fields (name, data kind)."""
    about = content.config_records.get(P.SITE)
    if about is None:
        return ConfigRecord({})
    return ConfigRecord({k: about[k] for k in (P.SITE_NAME, P.DATA_KIND) if isinstance(about.get(k), str)})


def claimed_site(content: RecordDict) -> str:
    """The site name a reply claims ('' when none): only a claim, bound to the node by the caller."""
    about = content.config_records.get(P.SITE)
    name = about.get(P.SITE_NAME) if about is not None else None
    return name if isinstance(name, str) and re.fullmatch(r"[\w.@+-]{1,100}", name) else ""


def usable_weights(weights: Sequence[float]) -> bool:
    """Flower's weighted mean divides by the sum: only finite, non-negative weights with a positive total."""
    return bool(weights) and all(math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0


def error_text(reason: str) -> str:
    """Flower's error reason without its wrapper ("<class 'X'>:<'msg'>" and the simulation's ClientAppException)."""
    text = str(reason)
    match = re.fullmatch(r"<class '([\w.]+)'>:<'(.*)'>", text, flags=re.DOTALL)
    if match:
        name, text = match.group(1).rsplit(".", 1)[-1], match.group(2)
        text = re.sub(r"^\s*Exception ClientAppException occurred\. Message:\s*", "", text)
        text = text if name == "ClientAppException" else f"{name}: {text}"
    return " ".join(text.split())[:500]
