"""The model on the wire: every array of a message's ArrayRecord packed into one byte buffer, and back, losslessly.

Flower moves a message as a tree of objects, one (or more) per array, each its own HTTP request on
every hop (ServerApp → SuperLink → SuperNode → ClientApp and back): ~100 tensors of a tiny hybrid
cost ~2 s per hop on a loaded 2-core machine. Packed, a model is a handful of objects. Only the
transport changes: the server packs what it sends and unpacks what it receives (server/exchange.py),
each site unpacks before running and packs its reply (client/entry.py), so strategies, DP wrappers,
mods and histofed's own code all see the keyed ArrayRecord as before.
"""

from __future__ import annotations

import json
import os

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common import protocol as P

PACKED = "arrays-packed"  # ArrayRecord holding one uint8 Array: the raw bytes of every array, in key order
LAYOUT = "arrays-layout"  # ConfigRecord {"layout": JSON [[key, dtype, shape], ...]}
ENABLED = os.environ.get("HISTOFED_WIRE_PACK", "1") != "0"  # 0: one object per array (bench_deploy's baseline)


class PackingError(ValueError):
    """A packed model whose layout does not fit its bytes."""


def pack(content: RecordDict, key: str = P.ARRAYS) -> RecordDict:
    """The same content with ArrayRecord `key` packed (a new RecordDict; unchanged when it has none)."""
    arrays = content.array_records.get(key)
    if arrays is None or not ENABLED:
        return content
    layout, parts = [], []
    for name in arrays.keys():
        value = np.asarray(arrays[name].numpy(), order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
        layout.append([name, value.dtype.str, list(value.shape)])
        parts.append(value.reshape(-1).view(np.uint8))
    buffer = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    out = RecordDict({k: v for k, v in content.items() if k != key})
    out[PACKED] = ArrayRecord({key: Array(buffer)})
    out[LAYOUT] = ConfigRecord({"layout": json.dumps(layout)})
    return out


def unpack(content: RecordDict) -> RecordDict:
    """The content with its packed arrays back as a keyed ArrayRecord (unchanged when nothing is packed).

    Raises PackingError when the layout does not fit the bytes (a malformed or hostile message).
    """
    packed = content.array_records.get(PACKED)
    if packed is None:
        return content
    try:
        ((key, blob),) = packed.items()
        layout = json.loads(str(content.config_records[LAYOUT]["layout"]))
        buffer = np.ascontiguousarray(blob.numpy()).reshape(-1).view(np.uint8)
        arrays, offset = {}, 0
        for name, dtype, shape in layout:
            dt = np.dtype(dtype)
            if dt.hasobject:
                raise PackingError(f"array '{name}' has an object dtype")
            count = int(np.prod(shape, dtype=np.int64))
            end = offset + count * dt.itemsize
            if end > buffer.size:
                raise PackingError(f"array '{name}' runs past the packed bytes")
            arrays[str(name)] = Array(buffer[offset:end].view(dt).reshape(shape).copy())
            offset = end
        if offset != buffer.size:
            raise PackingError(f"{buffer.size - offset} packed bytes are left over")
    except PackingError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise PackingError(f"malformed packed arrays: {err}") from None
    out = RecordDict({k: v for k, v in content.items() if k not in (PACKED, LAYOUT)})
    out[str(key)] = ArrayRecord(arrays)
    return out
