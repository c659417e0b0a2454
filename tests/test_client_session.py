"""A restarted site waits out its previous Flower session instead of calling its key unregistered."""

from __future__ import annotations

from pathlib import Path

import pytest

from client import deploy
from client.refusals import NOT_REGISTERED_CAUSE, Refusal

OPT = deploy.NodeOptions(site="site-a", data_root=None, server="127.0.0.1:9092", insecure=True, warm=False)


def test_the_session_record_names_server_and_key_and_expires(tmp_path: Path) -> None:
    path = deploy.session_file(tmp_path / "site-a.log", "site-a")
    assert deploy.held_for(path, OPT) == 0.0  # never connected
    deploy.mark_alive(path, OPT, now=1000.0)
    assert deploy.held_for(path, OPT, now=1010.0) == pytest.approx(deploy.SESSION_HELD_S - 10)
    assert deploy.held_for(path, OPT, now=1000.0 + deploy.SESSION_HELD_S + 1) == 0.0  # expired
    other = deploy.NodeOptions(site="site-a", data_root=None, server="10.0.0.9:9092", insecure=True)
    assert deploy.held_for(path, other, now=1010.0) == 0.0  # another server's session
    path.write_text("{not json")
    assert deploy.held_for(path, OPT) == 0.0


@pytest.mark.parametrize("recent", [False, True])
def test_a_code_2004_refusal_is_final_unless_this_site_was_connected_moments_ago(tmp_path: Path, monkeypatch, recent) -> None:
    log = tmp_path / "site-a.log"
    if recent:
        deploy.mark_alive(deploy.session_file(log, "site-a"), OPT)
    calls, said = [], []

    def watch(proc, log_path, say, stop, tls_check=None, alive=None):
        calls.append(1)
        if len(calls) == 4:  # the operator stops it (only reached while it keeps retrying)
            stop["now"] = True
            return 0, None
        return 305, Refusal(NOT_REGISTERED_CAUSE, retry=True)

    monkeypatch.setattr(deploy, "_watch", watch)
    monkeypatch.setattr(deploy.subprocess, "Popen", lambda *a, **k: None)
    monkeypatch.setattr(deploy.time, "sleep", lambda s: None)
    code = deploy._supervise(OPT, log, said.append, {})
    if recent:
        assert code == 0 and len(calls) == 4  # kept retrying through the held session
        assert sum("still holds this site's previous connection" in line for line in said) == 1
        assert not any(line.startswith("error:") for line in said)
    else:
        assert code == 1 and len(calls) == 2  # one quiet retry, then the one-line refusal
        assert said[-1].startswith(f"error: {NOT_REGISTERED_CAUSE}")
