"""`fedpeft certs` and `fedpeft keys`: files that Flower's own loaders accept, keys kept private."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

from fedpeft.cli import main
from fedpeft.config import ConfigError
from fedpeft.deploy import make_certificates, make_site_keys, site_names


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certificates_chain_to_the_ca_and_name_every_host(tmp_path: Path) -> None:
    files = make_certificates(tmp_path, hosts=["127.0.0.1", "localhost", "link.example.org"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "link.example.org"]
    key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert _mode(files.server_key) == _mode(files.ca_key) == 0o600
    assert _mode(files.server_cert) == _mode(files.ca_cert) == 0o644
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 365 <= lifetime.days <= 366


def test_certificates_refuse_to_overwrite_unless_forced(tmp_path: Path) -> None:
    files = make_certificates(tmp_path, days=2)
    before = files.ca_cert.read_bytes()
    with pytest.raises(ConfigError, match=r"refusing to overwrite .*ca\.crt.*--force"):
        make_certificates(tmp_path)
    assert files.ca_cert.read_bytes() == before
    files.server_key.chmod(0o644)
    make_certificates(tmp_path, force=True)
    assert files.ca_cert.read_bytes() != before
    assert _mode(files.server_key) == 0o600  # a forced rewrite also tightens the mode


@pytest.mark.parametrize(
    ("hosts", "days", "message"),
    [
        (["bad host!"], 1, "neither an IP address nor a DNS name"),
        ([" "], 1, "no --host given"),
        (["127.0.0.1"], 0, "--days 0"),
    ],
)
def test_certificate_arguments_are_checked(
    tmp_path: Path, hosts: list[str], days: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_certificates(tmp_path, hosts=hosts, days=days)
    assert list(tmp_path.iterdir()) == []


def test_site_keys_load_with_flowers_own_loaders(tmp_path: Path) -> None:
    keys = make_site_keys(tmp_path, ["hospital-a", "bank_b"])
    assert [k.name for k in keys] == ["hospital-a", "bank_b"]
    for key in keys:
        # What flower-supernode --auth-supernode-private-key does with the file.
        private = serialization.load_ssh_private_key(key.private_key.read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert uses_nist_ec_curve(private.public_key())
        assert private.curve.name == "secp384r1"
        # What `flwr supernode register KEY.pub` does with the file.
        assert try_load_public_key(key.public_key) == public_key_to_bytes(private.public_key())
        assert _mode(key.private_key) == 0o600 and _mode(key.public_key) == 0o644
    assert keys[0].public_key.read_bytes() != keys[1].public_key.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        make_site_keys(tmp_path, ["bank_b"])


def test_site_names() -> None:
    assert site_names(sites=3) == ["site-1", "site-2", "site-3"]
    assert site_names(names=["a", "b"]) == ["a", "b"]
    for kwargs, message in [
        ({"sites": 0}, "--sites 0"),
        ({}, "--sites None"),
        ({"sites": 2, "names": ["a"]}, "not both"),
        ({"names": ["../evil"]}, "become file names"),
        ({"names": ["a", "a"]}, "repeat"),
    ]:
        with pytest.raises(ConfigError, match=message):
            site_names(**kwargs)  # type: ignore[arg-type]


def test_cli_certs_and_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "--out", str(tmp_path / "c"), "--host", "10.1.2.3"]) == 0
    assert "--ssl-certfile" in capsys.readouterr().out
    server = x509.load_pem_x509_certificate((tmp_path / "c" / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert main(["certs", "--out", str(tmp_path / "c")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["keys", "--out", str(tmp_path / "k"), "--sites", "2"]) == 0
    assert "flwr supernode register" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "site-1.key",
        "site-1.pub",
        "site-2.key",
        "site-2.pub",
    ]
