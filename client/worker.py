"""The warm site worker of `flower-client start`: torch, the model and the data stay loaded; ClientApps hand it their messages.

Flower starts a fresh `flwr-clientapp` process for every message; without a worker each one pays
`import torch` + timm and rebuilds the model. The worker imports `client.app` once and runs it on the
messages the ClientApp forwards (client.warm), on a unix socket that only this user can reach:
the folder is 0700, the socket 0600, the caller's uid (SO_PEERCRED, Linux) must be this user's and
it must present the secret token kept in the folder (0600). It serves only the app version it runs:
a ClientApp whose bundle hashes differently is refused and runs the message itself.

Usage (done by `flower-client start`): python -m client.worker --dir FOLDER [--parent-pid PID]
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from flwr.app import Context, Message

from client import timing
from client.warm import (
    ENV_DIR, PROTOCOL, SOCKET_NAME, TOKEN_NAME, app_hash, bundle_root, decode_context, decode_message,
    encode_message, recv_frame, recv_json, send_frame, send_json,
)

Handler = Callable[[Message, Context], Message]


def peer_uid(conn: socket.socket) -> int | None:
    """The uid of the process at the other end of a unix socket (None where SO_PEERCRED does not exist)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


class WarmWorker:
    """Serves forwarded ClientApp messages, one at a time (a SuperNode runs one message at a time)."""

    def __init__(self, folder: Path, handler: Handler | None = None, *, app_root: Path | None = None,
                 trusted_uid: int | None = None) -> None:
        self.folder = Path(folder)
        self.handler = handler or _client_app
        self.app = app_hash(app_root or bundle_root())
        self.trusted_uid = os.getuid() if trusted_uid is None else trusted_uid
        self.token = secrets.token_hex(32)
        self.served = 0
        self._sock: socket.socket | None = None

    def bind(self) -> None:
        """Write the token (0600) and listen on the socket (0600) in the private folder (made 0700)."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        fd = os.open(self.folder / TOKEN_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.token)
        path = self.folder / SOCKET_NAME
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(8)
        self._sock = sock

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        """Accept and handle connections until `stop` is set (checked every second)."""
        assert self._sock is not None, "bind() first"
        self._sock.settimeout(1.0)
        while stop is None or not stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break  # closed
            with conn:
                conn.settimeout(None)
                try:
                    self.handle(conn)
                except (OSError, ValueError) as err:  # a caller that went away or spoke nonsense
                    print(f"histofed worker: connection dropped: {err}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop listening and remove the socket and the token."""
        if self._sock is not None:
            self._sock.close()
        for name in (SOCKET_NAME, TOKEN_NAME):
            (self.folder / name).unlink(missing_ok=True)

    def refusal(self, conn: socket.socket, header: dict) -> str:
        """Why this caller is not served ('' = served): another user, a wrong token, another protocol or app version."""
        uid = peer_uid(conn)
        if uid is not None and uid != self.trusted_uid:
            return f"caller uid {uid} is not this worker's user"
        if not hmac.compare_digest(str(header.get("token", "")), self.token):
            return "wrong or missing token"
        if header.get("protocol") != PROTOCOL:
            return f"protocol {header.get('protocol')!r}, this worker speaks {PROTOCOL}"
        if header.get("app") != self.app:
            return (f"app version {str(header.get('app'))[:12]} differs from the worker's {self.app[:12]} "
                    "(restart flower-client to serve the new bundle)")
        return ""

    def handle(self, conn: socket.socket) -> None:
        """One exchange (client.warm): header, verdict, message + context, result + reply."""
        header = recv_json(conn)
        reason = self.refusal(conn, header)
        if reason:
            print(f"histofed worker: refused a caller: {reason}", file=sys.stderr, flush=True)
            send_json(conn, {"ok": False, "error": reason})
            return
        send_json(conn, {"ok": True})
        msg = decode_message(recv_frame(conn))
        context = decode_context(recv_frame(conn))
        timing.begin()
        timing.stamp(timing.IMPORTS)  # everything the compute needs is loaded already
        try:
            reply = self.handler(msg, context)
        except Exception as err:  # noqa: BLE001 - the error goes back as the message's error
            traceback.print_exc()
            send_json(conn, {"ok": False, "error": f"{type(err).__name__}: {err}"})
            return
        send_json(conn, {"ok": True})
        send_frame(conn, encode_message(reply))
        self.served += 1


def _client_app(msg: Message, context: Context) -> Message:
    from client.app import app  # imported once, at the worker's start (main preloads it)

    return app(msg, context)


@contextlib.contextmanager
def started_worker(log_path: Path, say: Callable[[str], None]) -> Iterator[dict[str, str]]:
    """Start a worker for this flower-client in a fresh private folder; yields the environment its SuperNode needs."""
    folder = Path(tempfile.mkdtemp(prefix="histofed-worker-"))  # 0700, short: unix socket paths are limited
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "client.worker", "--dir", str(folder),
                                 "--parent-pid", str(os.getpid())], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    say(f"warm worker starting (pid {proc.pid}, log {log_path})")
    try:
        yield {ENV_DIR: str(folder)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def _watch_parent(pid: int, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            stop.set()
            return
        except PermissionError:
            pass
        time.sleep(2.0)


def main(argv: list[str] | None = None) -> None:
    """Preload the ClientApp (torch, timm, histofed), then serve until SIGTERM or the parent's end."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="private folder for the socket and the token")
    parser.add_argument("--parent-pid", type=int, default=0, help="stop when this process ends")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    import client.app  # noqa: F401  - torch, timm and histofed, once

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, stop), daemon=True).start()
    worker = WarmWorker(args.dir)
    worker.bind()
    print(f"histofed worker: ready in {time.perf_counter() - started:.1f} s on {args.dir / SOCKET_NAME} "
          f"(app {worker.app[:12]})", flush=True)
    try:
        worker.serve_forever(stop)
    finally:
        worker.close()
        print(f"histofed worker: stopped after {worker.served} message(s)", flush=True)


if __name__ == "__main__":
    main()
