"""Why a hospital cannot join, recognised from Flower 1.42's SuperNode output (as printed on this machine) and a TLS probe."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from client.refusals import NOT_REGISTERED_CAUSE, failed_messages, recognise, speaks_tls
from common import protocol as P

EXIT_305 = ("ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n{}\n"
            "The SuperNode could not establish a connection to the SuperLink.\n")


@pytest.mark.parametrize("line, fragment, retry", [
    ("[code: 2004] Failed to activate SuperNode.", "not registered", True),
    ("[code: 2001] SuperNode authentication is enabled. All SuperNodes must be registered via the CLI.",
     "pass --auth-key", False),
    ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate signature failure (_ssl.c:1006)",
     "not signed by the CA", False),
    ("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)", "does not speak TLS", False),
])
def test_each_refusal_is_one_actionable_line(line: str, fragment: str, retry: bool) -> None:
    refusal = recognise("INFO :      Starting Flower SuperNode\n" + EXIT_305.format(line))
    assert refusal is not None and fragment in refusal.cause and refusal.retry == retry
    assert "\n" not in refusal.cause
    assert recognise("WARNING :   Connection attempt failed, retrying in 0.89 seconds\n") is None  # not a refusal


def test_an_identity_refusal_and_failed_messages_are_read_from_the_clientapps_traceback() -> None:
    log = ("ERROR :     ClientApp raised an exception\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
           f"client.site.SiteRefused: {P.REFUSED} its key is registered for site 'h-1' but it calls itself 'h-2' "
           "(flower-client start --site)\n"
           "ERROR :     ClientApp raised an exception\nTraceback (most recent call last):\n"
           "common.datasets.images.BadImageError: site h-2: cannot read a.png (data.strict=true)\n")
    refusal = recognise(log)
    assert refusal is not None and not refusal.retry
    assert refusal.cause == ("refused by the server: its key is registered for site 'h-1' but it calls itself 'h-2' "
                             "(flower-client start --site)")
    assert failed_messages(log)[1] == "BadImageError: site h-2: cannot read a.png (data.strict=true)"
    assert NOT_REGISTERED_CAUSE.startswith("the server refused this site's key")


def _serve_once(sock: socket.socket, tls: ssl.SSLContext | None) -> None:
    conn, _ = sock.accept()
    try:
        if tls is not None:
            with tls.wrap_socket(conn, server_side=True):
                pass
        else:
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    except (ssl.SSLError, OSError):
        pass
    finally:
        conn.close()


@pytest.mark.parametrize("tls", [True, False])
def test_the_tls_probe_tells_tls_from_plain_from_nothing(tmp_path: Path, tls: bool) -> None:
    from server.keys import make_kit

    kit = make_kit(tmp_path, hosts=["127.0.0.1"], sites=["a"])
    context = None
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(kit.server_cert, kit.server_key)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        thread = threading.Thread(target=_serve_once, args=(server, context), daemon=True)
        thread.start()
        assert speaks_tls(f"127.0.0.1:{port}") is tls
        thread.join(timeout=5)
    assert speaks_tls(f"127.0.0.1:{port}", timeout=1) is None  # nothing listens any more
