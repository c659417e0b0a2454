"""The warm site worker and the ClientApp's forwarding path: same replies, private socket, refusals, fallback."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client import warm
from client.worker import WarmWorker
from common import protocol as P
from common.model import build_model

pytestmark = pytest.mark.usefixtures("task_identity")


def _message(cfg, message_type: str = MessageType.TRAIN, arrays: ArrayRecord | None = None,
             **config) -> tuple[Message, Context]:
    arrays = arrays or ArrayRecord(build_model(cfg.model).state_dict())
    msg = Message(RecordDict({P.ARRAYS: arrays, P.CONFIG: ConfigRecord({P.SERVER_ROUND: 1, **config})}),
                  dst_node_id=7, message_type=message_type)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2},
                  state=RecordDict(), run_config=cfg.to_flat())
    return msg, ctx


@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hf-test-"))  # short: unix socket paths are limited to ~107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _serving(worker: WarmWorker) -> threading.Event:
    worker.bind()
    stop = threading.Event()
    threading.Thread(target=worker.serve_forever, args=(stop,), daemon=True).start()
    return stop


def test_a_forwarded_message_gets_the_reply_of_the_in_process_client_app(tiny_cfg, folder) -> None:
    from client.app import app

    worker = WarmWorker(folder)
    stop = _serving(worker)
    try:
        arrays = ArrayRecord(build_model(tiny_cfg.model).state_dict())
        msg, ctx = _message(tiny_cfg, arrays=arrays)
        warm_reply = warm.forward(msg, ctx, folder)
        local_reply = app(*_message(tiny_cfg, arrays=arrays))
    finally:
        stop.set()
    assert warm_reply is not None and worker.served == 1
    assert warm_reply.metadata.reply_to_message_id == msg.metadata.message_id
    got, want = warm_reply.content[P.ARRAYS], local_reply.content[P.ARRAYS]
    assert list(got.keys()) == list(want.keys())
    assert all(np.array_equal(got[k].numpy(), want[k].numpy()) for k in want.keys())  # same seed, same weights
    assert dict(warm_reply.content[P.METRICS])[P.NUM_EXAMPLES] == tiny_cfg.data.train_per_site
    stamps = warm_reply.content[P.TIMING]
    assert stamps["imports"] <= stamps["ready"] <= stamps["computed"]


def test_the_worker_folder_socket_and_token_are_private(folder) -> None:
    worker = WarmWorker(folder, handler=lambda m, c: m)
    worker.bind()
    try:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / warm.SOCKET_NAME).stat().st_mode) == 0o600
        assert stat.S_IMODE((folder / warm.TOKEN_NAME).stat().st_mode) == 0o600
    finally:
        worker.close()
    assert not (folder / warm.SOCKET_NAME).exists() and not (folder / warm.TOKEN_NAME).exists()


def test_another_app_version_or_user_is_refused_and_the_client_app_runs_it_itself(tiny_cfg, folder) -> None:
    served = []
    msg, ctx = _message(tiny_cfg, MessageType.EVALUATE)
    for worker in (WarmWorker(folder, handler=lambda m, c: served.append(m) or m),
                   WarmWorker(folder, handler=lambda m, c: served.append(m) or m, trusted_uid=os.getuid() + 1)):
        if worker.trusted_uid == os.getuid():
            worker.app = "0" * 64  # the worker runs another version than this bundle
        stop = _serving(worker)
        try:
            assert warm.forward(msg, ctx, folder) is None  # refused: the caller falls back
        finally:
            stop.set()
            worker.close()
    assert not served


def test_a_caller_without_the_token_is_refused(folder) -> None:
    worker = WarmWorker(folder, handler=lambda m, c: m)
    stop = _serving(worker)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(folder / warm.SOCKET_NAME))
            warm.send_json(sock, {"protocol": warm.PROTOCOL, "token": "guess", "app": worker.app})
            answer = warm.recv_json(sock)
    finally:
        stop.set()
    assert answer == {"ok": False, "error": "wrong or missing token"} and worker.served == 0


def test_without_a_worker_the_entry_runs_in_process_and_stamps_the_reply(tiny_cfg, monkeypatch) -> None:
    from client.entry import handle

    monkeypatch.delenv(warm.ENV_DIR, raising=False)
    reply = handle(*_message(tiny_cfg, MessageType.EVALUATE))
    stamps = reply.content[P.TIMING]
    assert stamps["path"] == "in-process"
    assert stamps["process-start"] <= stamps["app-loaded"] <= stamps["handler"] <= stamps["imports"]
    assert stamps["ready"] <= stamps["computed"] <= stamps["replied"]


def test_the_forwarding_path_imports_no_torch() -> None:
    code = "import sys, client.entry, client.warm; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_train_reply_can_carry_the_evaluation_of_the_model_it_received(tiny_cfg) -> None:
    from client.app import evaluate_site, train

    arrays = ArrayRecord(build_model(tiny_cfg.model).state_dict())
    plain = evaluate_site(*_message(tiny_cfg, MessageType.EVALUATE, arrays))
    both = train(*_message(tiny_cfg, arrays=arrays, **{P.EVALUATE_RECEIVED: True}))
    assert dict(both.content[P.EVALUATION]) == dict(plain.content[P.METRICS])  # same model, same data
    assert P.EVALUATION not in train(*_message(tiny_cfg)).content.metric_records
