"""Handing a ClientApp message to this site's warm worker (client.worker) over a private unix socket: the forwarding side.

The worker is started by `flower-client start` and keeps torch, the model and the data loaded, so a
fresh `flwr-clientapp` process (one per message, Flower's rule) only forwards. This side imports no
torch. The exchange, all on one private socket (0600 in a 0700 folder):

1. ClientApp → worker: a JSON header {protocol, token, app}: the secret token from the worker's
   folder and the hash of the app bundle the SuperNode installed (every .py of the bundle).
2. worker → ClientApp: {"ok": true} or {"ok": false, "error": ...} (wrong token, another user, another
   app version: the worker refuses, and the ClientApp runs the message itself).
3. ClientApp → worker: the Message and the Context, each in Flower's own protobuf serde (never pickle).
4. worker → ClientApp: {"ok": ...} and the reply Message (protobuf), or the error it raised.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.supercore import log

ENV_DIR = "HISTOFED_WORKER_DIR"  # set by `flower-client start` for its SuperNode (and so for every ClientApp)
SOCKET_NAME = "worker.sock"
TOKEN_NAME = "token"
PROTOCOL = 1
BUNDLE_PACKAGES = ("client", "common", "server")  # the app bundle (pyproject fab-include)
MAX_HEADER = 64 * 1024
MAX_FRAME = 1 << 31  # protobuf's own limit on one message
HANDSHAKE_TIMEOUT_S = 120.0  # a worker still busy with an abandoned message this long: run in process instead
_LENGTH = struct.Struct("!Q")


class WorkerError(RuntimeError):
    """The warm worker accepted a message and then failed it (its error is the message's error)."""


def bundle_root() -> Path:
    """The folder this code was imported from (for a ClientApp: the bundle the SuperNode installed)."""
    return Path(__file__).resolve().parents[1]


def app_hash(root: Path) -> str:
    """SHA-256 over the relative path and bytes of every .py file of the bundle's packages under root."""
    digest = hashlib.sha256()
    for package in BUNDLE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def send_frame(sock: socket.socket, data: bytes) -> None:
    """One length-prefixed frame."""
    sock.sendall(_LENGTH.pack(len(data)))
    sock.sendall(data)


def recv_frame(sock: socket.socket, limit: int = MAX_FRAME) -> bytes:
    """One length-prefixed frame of at most `limit` bytes; ConnectionError when the peer went away."""
    (size,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size))
    if size > limit:
        raise ConnectionError(f"frame of {size} bytes exceeds the limit of {limit}")
    return _recv_exactly(sock, size)


def send_json(sock: socket.socket, obj: dict[str, Any]) -> None:
    """A JSON header frame."""
    send_frame(sock, json.dumps(obj).encode())


def recv_json(sock: socket.socket) -> dict[str, Any]:
    """A JSON header frame (at most 64 KiB), as a dict."""
    obj = json.loads(recv_frame(sock, MAX_HEADER))
    if not isinstance(obj, dict):
        raise ConnectionError("malformed header frame")
    return obj


def encode_message(msg: Message) -> bytes:
    """A Flower Message in Flower's protobuf serde."""
    return message_to_proto(msg).SerializeToString()


def decode_message(data: bytes) -> Message:
    """The Message of `encode_message`."""
    return message_from_proto(ProtoMessage.FromString(data))


def encode_context(context: Context) -> bytes:
    """A Flower Context in Flower's protobuf serde."""
    return context_to_proto(context).SerializeToString()


def decode_context(data: bytes) -> Context:
    """The Context of `encode_context`."""
    return context_from_proto(ProtoContext.FromString(data))


def forward(msg: Message, context: Context, directory: str | os.PathLike | None = None) -> Message | None:
    """The warm worker's reply to msg; None when no worker is up or it refused (the caller then runs it in process).

    Raises WorkerError when the worker accepted the message and failed it, or died while computing.
    """
    where = directory or os.environ.get(ENV_DIR)
    if not where or not (Path(where) / SOCKET_NAME).exists():
        return None  # simulation, or a plain flower-supernode: no worker
    folder = Path(where)
    try:
        token = (folder / TOKEN_NAME).read_text().strip()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(HANDSHAKE_TIMEOUT_S)
        sock.connect(str(folder / SOCKET_NAME))
    except OSError as err:
        log(WARNING, "histofed: no warm worker at %s (%s); running the message in process", folder, err)
        return None
    with sock:
        try:
            send_json(sock, {"protocol": PROTOCOL, "token": token, "app": app_hash(bundle_root())})
            answer = recv_json(sock)
        except (OSError, ValueError) as err:
            log(WARNING, "histofed: warm worker did not answer (%s); running the message in process", err)
            return None
        if not answer.get("ok"):
            log(WARNING, "histofed: warm worker refused: %s; running the message in process", answer.get("error"))
            return None
        sock.settimeout(None)  # computing may take as long as the round allows
        try:
            send_frame(sock, encode_message(msg))
            send_frame(sock, encode_context(context))
            result = recv_json(sock)
            if not result.get("ok"):
                raise WorkerError(f"warm worker: {result.get('error', 'unknown error')}")
            reply = decode_message(recv_frame(sock))
        except (OSError, ValueError) as err:
            raise WorkerError(f"warm worker went away while handling the message: {err}") from err
    return Message(content=reply.content, reply_to=msg)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view[got:], min(size - got, 1 << 20))
        if n == 0:
            raise ConnectionError("the peer closed the connection")
        got += n
    return bytes(buf)
