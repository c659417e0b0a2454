"""One round-trip of messages to the sites: Flower's push/pull with a short poll, each reply's timing, and evaluation views.

Flower's `Grid.send_and_receive` polls the SuperLink for replies every 3 s (hard-coded); pushing and
pulling through the Grid's own `push_messages` / `pull_messages` every POLL_S seconds costs one small
request each and gives the replies as soon as they are there. Every reply is stamped when it was
pulled, so together with the stamps the site put in it (client.timing) a message's way can be laid
out phase by phase (simulations/bench_deploy.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from logging import ERROR

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from common import protocol as P
from common.wire import PackingError, pack, unpack

POLL_S = float(os.environ.get("HISTOFED_REPLY_POLL_S", "0.2"))  # bench_deploy's baseline sets Flower's 3 s


@dataclass
class Exchange:
    """The replies to one batch of messages, the messages they answer, and when each was sent and pulled."""

    replies: list[Message] = field(default_factory=list)
    requests: dict[str, Message] = field(default_factory=dict)  # instruction by message id
    sent: float = 0.0
    received: dict[str, float] = field(default_factory=dict)  # by the instruction's message id

    def timing(self, server_round: int, phase: str) -> list[dict[str, Any]]:
        """One record per reply: round, phase, site, sent/received (server clock) and the site's own stamps."""
        out = []
        for msg in self.replies:
            answered = msg.metadata.reply_to_message_id
            record: dict[str, Any] = {"round": server_round, "phase": phase, "node": msg.metadata.src_node_id,
                                      "sent": self.sent, "received": self.received.get(answered, 0.0)}
            if msg.has_error():
                record["error"] = msg.error.reason[:200]
            else:
                record["site"] = str(msg.content.config_records.get(P.SITE, {}).get(P.SITE_NAME, ""))
                record["client"] = dict(msg.content.config_records.get(P.TIMING, {}))
            out.append(record)
        return out


def send_and_receive(grid: Grid, messages: Iterable[Message], *, timeout: float) -> Exchange:
    """Push the messages (model packed: common/wire.py), pull replies every POLL_S s until all arrived or `timeout` s passed.

    As Flower's `send_and_receive`, but replies are seen within POLL_S and come back unpacked.
    """
    messages = list(messages)
    packed: dict[int, RecordDict] = {}  # Flower's messages of one batch share one RecordDict: pack it once
    for msg in messages:
        msg.content = packed.setdefault(id(msg.content), pack(msg.content))
    ids = list(grid.push_messages(messages))
    out = Exchange(requests={i: m for i, m in zip(ids, messages) if i}, sent=time.time())
    pending = set(out.requests)
    deadline = out.sent + timeout
    while pending:
        for msg in grid.pull_messages(list(pending)):
            answered = msg.metadata.reply_to_message_id
            out.received[answered] = time.time()
            pending.discard(answered)
            out.replies.append(_unpacked(msg))
        if not pending or time.time() >= deadline:
            break
        time.sleep(POLL_S)
    return out


def _unpacked(msg: Message) -> Message:
    """A reply with its model unpacked; a malformed packing loses its arrays (the update check then rejects it)."""
    if msg.has_error():
        return msg
    try:
        msg.content = unpack(msg.content)
    except PackingError as err:
        site = msg.content.config_records.get(P.SITE, {}).get(P.SITE_NAME, msg.metadata.src_node_id)
        log(ERROR, "Reply from site %s: %s", site, err)
        msg.content = RecordDict({k: v for k, v in msg.content.items() if k not in msg.content.array_records})
    return msg


def evaluation_views(exchange: Exchange) -> list[Message]:
    """federation.evaluate-with-train: each train reply's evaluation of the model it received, as an evaluate reply.

    The evaluation record is taken out of the train reply (Flower's aggregation wants exactly one
    MetricRecord); failed replies stay failures; a reply without one (the site did not evaluate) is left out.
    """
    views = []
    for msg in exchange.replies:
        if msg.has_error():
            views.append(msg)
            continue
        evaluation = msg.content.metric_records.get(P.EVALUATION)
        if evaluation is None:
            continue
        del msg.content[P.EVALUATION]
        content = RecordDict({P.METRICS: evaluation, P.SITE: msg.content[P.SITE]})
        views.append(Message(content=content, reply_to=exchange.requests[msg.metadata.reply_to_message_id]))
    return views
