"""Security kit: a CA-signed server certificate for the given hosts and OpenSSH ECDSA keys per site."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.keys import make_kit


def test_kit_chains_to_the_ca_and_names_the_hosts(tmp_path) -> None:
    kit = make_kit(tmp_path, hosts=["hospital-hub.example", "127.0.0.1"], sites=["site-a", "site-b"])
    ca = x509.load_pem_x509_certificate(kit.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(kit.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hospital-hub.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sorted(kit.site_keys) == ["site-a", "site-b"]
    private, public = kit.site_keys["site-a"]
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert oct(private.stat().st_mode)[-3:] == "600" and oct(kit.server_key.stat().st_mode)[-3:] == "600"


def test_never_overwrites_and_rejects_bad_names(tmp_path) -> None:
    make_kit(tmp_path, hosts=["localhost"], sites=["a"])
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_kit(tmp_path, hosts=["localhost"], sites=["a"])
    with pytest.raises(ValueError, match="invalid site name"):
        make_kit(tmp_path / "new", hosts=["localhost"], sites=["../x"])


def test_the_ca_key_is_kept_apart_from_what_sites_receive(tmp_path) -> None:
    from typer.testing import CliRunner

    from server.cli import app

    result = CliRunner().invoke(app, ["keys", "--out", str(tmp_path / "kit"), "--hosts", "localhost",
                                      "--sites", "site-a,site-b"])
    assert result.exit_code == 0, result.output
    kit = tmp_path / "kit"
    assert (kit / "ca" / "ca.key").is_file() and not (kit / "ca.key").exists()
    for site in ("site-a", "site-b"):  # a site's folder holds its private key and the CA certificate, nothing else
        assert sorted(p.name for p in (kit / "sites" / site).iterdir()) == ["ca.crt", site]
    assert not list((kit / "sites").rglob("*.key")) and not list((kit / "sites").rglob("*.pub"))
    assert "ca/ca.key" in result.output and "never hand it out" in result.output
    again = CliRunner().invoke(app, ["keys", "--out", str(kit), "--hosts", "localhost", "--sites", "site-c"])
    assert again.exit_code == 2 and "refusing to overwrite" in again.output
