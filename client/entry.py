"""The ClientApp Flower loads on every node: hands each message to the site's warm worker, else runs client.app in process.

This module is what Flower imports in every per-message `flwr-clientapp` process, so it imports no
torch: with a warm worker up (`flower-client start`, client.worker) the message is forwarded to it
(client.warm); in simulation, with a plain `flower-supernode`, or when the worker refuses (another
app version), `client.app` — torch, timm and all — is imported here and runs the message itself.
Either way the reply carries the message's timing stamps (client.timing).
"""

from __future__ import annotations

import time

from client import timing

_PROCESS_START = timing.process_start()

from flwr.app import ConfigRecord, Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from client.warm import forward  # noqa: E402
from common import protocol as P  # noqa: E402
from common.wire import pack, unpack  # noqa: E402

_LOADED = time.time()
app = ClientApp()


def handle(msg: Message, context: Context) -> Message:
    """Forward to the warm worker, or run histofed's ClientApp (client.app) here; stamp the reply."""
    timing.begin()
    handler = time.time()
    msg.content = unpack(msg.content)  # the server packs the model for the wire (common/wire.py)
    reply = forward(msg, context)
    path = "warm"
    if reply is None:
        path = "in-process"
        from client.app import app as local  # torch, timm, histofed: paid by this process

        timing.stamp(timing.IMPORTS)
        reply = local(msg, context)
    if reply.has_content():
        stamps = dict(reply.content.config_records.get(P.TIMING, {}))
        stamps.update({timing.PROCESS_START: _PROCESS_START, timing.APP_LOADED: _LOADED, timing.HANDLER: handler,
                       timing.REPLIED: time.time(), timing.PATH: path})
        reply.content[P.TIMING] = ConfigRecord(stamps)
        reply.content = pack(reply.content)
    return reply


@app.train()
def train(msg: Message, context: Context) -> Message:
    """A training message (see `handle`)."""
    return handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """An evaluation message (see `handle`)."""
    return handle(msg, context)

