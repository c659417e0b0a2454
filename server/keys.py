"""Security kit: a consortium CA, a server certificate for given hosts/IPs, and one SuperNode key pair per site."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CURVE = ec.SECP384R1()  # Flower's SuperNode authentication expects ECDSA keys (OpenSSH format)


@dataclass(frozen=True)
class SecurityKit:
    """Paths of everything `make_kit` wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    site_keys: dict[str, tuple[Path, Path]]  # site → (private key, public key)


def _write(path: Path, data: bytes, *, private: bool) -> Path:
    path.write_bytes(data)
    path.chmod(0o600 if private else 0o644)
    return path


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


CA_DIR = "ca"  # out/ca/ca.key: signs server certificates; stays offline, never handed out
SITES_DIR = "sites"  # out/sites/<site>/: everything one hospital receives (its private key and ca.crt), nothing else


def make_kit(out: Path, *, hosts: list[str], sites: list[str], days: int = 825) -> SecurityKit:
    """Create the kit: out/ca/ca.key (offline), out/ca.crt, out/server.pem + server.key and out/<site>.pub (server),
    and per site out/sites/<site>/<site> (private key) + ca.crt: the folder handed to that hospital."""
    if not hosts or not sites:
        raise ValueError("give at least one server host/IP and one site name")
    bad = [s for s in sites if not s or "/" in s or s.startswith(".")]
    if bad:
        raise ValueError(f"invalid site name '{bad[0]}'")
    out.mkdir(parents=True, exist_ok=True)
    existing = [p for p in (out / CA_DIR / "ca.key", out / "ca.key", out / "server.key") if p.exists()]
    if existing:
        raise FileExistsError(f"{existing[0]} exists: refusing to overwrite a consortium's keys")
    now = datetime.datetime.now(datetime.timezone.utc)
    until = now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "histofed consortium CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(CURVE)
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])).issuer_name(ca_name)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until).add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    kit = SecurityKit(
        ca_cert=_write(out / "ca.crt", ca.public_bytes(pem), private=False),
        server_cert=_write(out / "server.pem", server.public_bytes(pem), private=False),
        server_key=_write(out / "server.key", _pem_key(server_key), private=True),
        site_keys={},
    )
    (out / CA_DIR).mkdir(mode=0o700, exist_ok=True)
    _write(out / CA_DIR / "ca.key", _pem_key(ca_key), private=True)
    for site in sites:
        key = ec.generate_private_key(CURVE)
        private = key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        handout = out / SITES_DIR / site
        handout.mkdir(parents=True, exist_ok=True)
        _write(handout / "ca.crt", kit.ca_cert.read_bytes(), private=False)
        kit.site_keys[site] = (_write(handout / site, private, private=True), _write(out / f"{site}.pub", public, private=False))
    return kit
