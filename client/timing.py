"""Wall-clock stamps of one message's way through a site (process start, imports, ready, compute), sent in the reply.

The stamps are `time.time()` values (seconds since the epoch) so that the server can line them up
with its own send/receive times: meaningful when both clocks agree (one machine, or NTP).
Plain Python and psutil only: the ClientApp's forwarding path imports this without torch.
"""

from __future__ import annotations

import time

import psutil

PROCESS_START = "process-start"  # the flwr-clientapp process was created
APP_LOADED = "app-loaded"  # Flower imported the bundle's ClientApp (client.entry)
HANDLER = "handler"  # the message reached histofed's handler
IMPORTS = "imports"  # what the compute needs is imported (torch, timm, ...; a warm worker has it already)
READY = "ready"  # data and model ready
EVALUATED = "evaluated"  # the received model was evaluated (federation.evaluate-with-train)
COMPUTED = "computed"  # training / evaluation done
REPLIED = "replied"  # the reply leaves histofed's handler
PATH = "path"  # "warm" (handed to the site's worker) or "in-process"

_stamps: dict[str, float] = {}


def process_start() -> float:
    """When this process was created (psutil, epoch seconds)."""
    return float(psutil.Process().create_time())


def begin() -> None:
    """A new message: forget the stamps of any earlier one (a warm worker handles many)."""
    _stamps.clear()


def stamp(name: str) -> None:
    """Record now under `name` for the message being handled (the first stamp of a name counts)."""
    _stamps.setdefault(name, time.time())


def take() -> dict[str, float]:
    """The stamps recorded since the last call (and forget them)."""
    out = dict(_stamps)
    _stamps.clear()
    return out
