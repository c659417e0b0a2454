"""Why a SuperNode cannot join, read from Flower's SuperNode output (and one TLS probe), as one line a hospital can act on."""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass

from common import protocol as P

# SuperNode output → cause. Flower 1.42 prints these and exits (code 305) within seconds.
FINAL = {
    "CERTIFICATE_VERIFY_FAILED": "TLS: the server's certificate is not signed by the CA given with --root-cert",
    "WRONG_VERSION_NUMBER": "TLS: the server does not speak TLS (started with --insecure?): pass --insecure, or use its TLS address",
    "code: 2001": "the server requires node authentication: pass --auth-key (this site's private key from `flower-server keys`)",
}
NOT_REGISTERED = "code: 2004"  # retried once: a server that has just started may still be registering site keys
NOT_REGISTERED_CAUSE = "the server refused this site's key: it is not registered ([server] site-keys / flwr supernode register)"
INSECURE_AGAINST_TLS = ("the server speaks TLS but --insecure was given: pass --root-cert CA.crt and --auth-key "
                        "(Flower itself would retry forever)")
_EXCEPTION_LINE = re.compile(r"^([\w.]+(?:Error|Exception|Refused|Failure)): (.+)$", re.MULTILINE)


@dataclass(frozen=True)
class Refusal:
    """Why this node cannot take part; `retry` when one more attempt may succeed (keys still being registered)."""

    cause: str
    retry: bool = False
    linger_s: float = 0.0  # keep the SuperNode this long so the ClientApp's error reply reaches the server


def recognise(text: str) -> Refusal | None:
    """The refusal named in new SuperNode output, if any (identity refusals by the ClientApp included)."""
    refused = text.find(P.REFUSED)
    if refused >= 0:
        line = text[refused:].splitlines()[0].rstrip("'\">")
        return Refusal("refused by the server: " + line[len(P.REFUSED):].strip(), linger_s=5.0)
    for marker, cause in FINAL.items():
        if marker in text:
            return Refusal(cause)
    if NOT_REGISTERED in text:
        return Refusal(NOT_REGISTERED_CAUSE, retry=True)
    return None


def failed_messages(text: str) -> list[str]:
    """One line per ClientApp exception in new SuperNode output (the exception's last traceback line)."""
    out = []
    for block in text.split("raised an exception")[1:]:
        match = _EXCEPTION_LINE.search(block)
        if match:
            out.append(f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2).strip()[:300]}")
    return out


def speaks_tls(address: str, timeout: float = 3.0) -> bool | None:
    """True if HOST:PORT completes a TLS handshake, False if it answers without TLS, None if it does not answer."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only the protocol is probed; Flower verifies the certificate itself
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return True
    except ssl.SSLError:
        return False
    except OSError:
        return None
