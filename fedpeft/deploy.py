"""Credentials for a real deployment: TLS certificates and SuperNode authentication keys.

This module owns the files a coordinator makes before starting Flower's ``flower-superlink``:

- a certificate authority (``ca.crt``, ``ca.key``) and a SuperLink server certificate signed
  by it (``server.pem``, ``server.key``) whose SubjectAltNames list every DNS name and IP
  address sites will dial. They go to ``flower-superlink --ssl-ca-certfile ca.crt
  --ssl-certfile server.pem --ssl-keyfile server.key``; each site and the coordinator's
  ``flwr`` CLI get only ``ca.crt`` (``flower-supernode --root-certificates ca.crt``).
- the coordinator's Ed25519 signing key (``coordinator.key``, ``coordinator.pub``): the
  ServerApp signs every train and evaluate instruction with it (run config
  ``coordinator-key``), and a site whose node config names ``coordinator-public-key``
  trains only for instructions it signed (:mod:`fedpeft.privacy.signing`);
- one ECDSA P-384 key pair per site in OpenSSH format: ``<name>.key`` for ``flower-supernode
  --auth-supernode-private-key`` (Flower reads it with ``load_ssh_private_key``) and
  ``<name>.pub`` for ``flwr supernode register`` (``load_ssh_public_key``; Flower accepts NIST
  curves only). Flower 1.41 has no command that makes these keys (its docs use ``ssh-keygen -t
  ecdsa -b 384``); making them here needs no OpenSSH on the machine. In production each site
  should make its own pair and send only the ``.pub`` file to the coordinator.

Everything is built with the ``cryptography`` package. Private keys are written with mode
0600 and no existing file is overwritten unless ``force`` is given. Starting and wiring the
Flower processes is left to Flower's own commands (README, "Run a real federation").
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.config import ConfigError

__all__ = [
    "CertificateFiles",
    "SiteKey",
    "make_certificates",
    "make_coordinator_key",
    "make_site_keys",
    "site_names",
]

#: File names, as Flower's docs and flags use them (``--ssl-*``, ``--root-certificates``).
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_DAYS = 365
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class CertificateFiles:
    """Paths of the files :func:`make_certificates` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class SiteKey:
    """One site's authentication key pair."""

    name: str
    private_key: Path  # OpenSSH private key: flower-supernode --auth-supernode-private-key
    public_key: Path  # OpenSSH public key: flwr supernode register


def _write(path: Path, data: bytes, *, private: bool, force: bool) -> None:
    """Write ``data`` to ``path``; a private file is created with mode 0600 from the start."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600 if private else 0o644)
    try:
        if private:
            os.fchmod(fd, 0o600)  # an overwritten file keeps its old mode otherwise
        os.write(fd, data)
    finally:
        os.close(fd)


def _refuse_existing(paths: Sequence[Path], *, force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"refusing to overwrite {', '.join(existing)}: pass --force to replace them, or "
            "choose another --out folder (sites holding the old files would need the new ones)."
        )


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
                raise ConfigError(
                    f"--host {host!r} is neither an IP address nor a DNS name; give the name "
                    "or address sites use to reach the SuperLink, e.g. --host 10.0.0.5 "
                    "--host superlink.example.org"
                ) from None
            names.append(x509.DNSName(host))
    return names


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_certificates(
    out: str | Path,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> CertificateFiles:
    """Make a CA and a SuperLink server certificate signed by it.

    Parameters
    ----------
    out : str or Path
        Folder to write ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` into
        (created if missing).
    hosts : sequence of str, default ("127.0.0.1", "localhost")
        Every IP address and DNS name sites and the ``flwr`` CLI use to reach the SuperLink;
        each becomes a SubjectAltName of the server certificate (TLS checks only those).
    days : int, default 365
        Validity of both certificates.
    force : bool, default False
        Replace existing files instead of refusing.

    Returns
    -------
    CertificateFiles
        The paths written.

    Raises
    ------
    ConfigError
        If a file exists (without ``force``), ``days`` < 1, ``hosts`` is empty or a host is
        neither an IP address nor a DNS name.
    """
    if days < 1:
        raise ConfigError(f"--days {days}: a certificate must be valid for at least 1 day")
    hosts = tuple(dict.fromkeys(h.strip() for h in hosts if h.strip()))
    if not hosts:
        raise ConfigError("no --host given: name the addresses sites use to reach the SuperLink")
    alt_names = _subject_alt_names(hosts)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    files = CertificateFiles(
        ca_cert=folder / CA_CERT,
        ca_key=folder / CA_KEY,
        server_cert=folder / SERVER_CERT,
        server_key=folder / SERVER_KEY,
        hosts=hosts,
    )
    _refuse_existing(
        [files.ca_cert, files.ca_key, files.server_cert, files.server_key], force=force
    )

    now = dt.datetime.now(dt.UTC)
    # Backdated a little: a site whose clock runs slightly behind still accepts the chain.
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    _write(files.ca_key, _pem_key(ca_key), private=True, force=force)
    _write(files.server_key, _pem_key(server_key), private=True, force=force)
    _write(files.ca_cert, ca_cert.public_bytes(pem), private=False, force=force)
    _write(files.server_cert, server_cert.public_bytes(pem), private=False, force=force)
    return files


def site_names(*, sites: int | None = None, names: Sequence[str] = ()) -> list[str]:
    """``names`` as given, or ``site-1`` … ``site-N``; each checked to be a safe file name."""
    if names and sites is not None:
        raise ConfigError("give either --sites N or --name NAME (repeatable), not both")
    if not names:
        if sites is None or sites < 1:
            raise ConfigError(f"--sites {sites}: give the number of sites (>= 1) or --name NAME")
        return [f"site-{i}" for i in range(1, sites + 1)]
    bad = [n for n in names if not _SITE_NAME.fullmatch(n)]
    if bad:
        raise ConfigError(
            f"--name {bad[0]!r}: site names become file names; use letters, digits, '-', '_' "
            "and '.', starting with a letter or digit (at most 64 characters)"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"--name values repeat: {list(names)}; give each site once")
    return list(names)


def make_site_keys(out: str | Path, names: Sequence[str], *, force: bool = False) -> list[SiteKey]:
    """Make one ECDSA P-384 authentication key pair per site, in OpenSSH format.

    Parameters
    ----------
    out : str or Path
        Folder to write ``<name>.key`` (private, mode 0600) and ``<name>.pub`` into.
    names : sequence of str
        Site names (see :func:`site_names`).
    force : bool, default False
        Replace existing files instead of refusing.

    Returns
    -------
    list of SiteKey
        One per name, in order.

    Raises
    ------
    ConfigError
        If a file exists and ``force`` is False.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    keys = [SiteKey(n, folder / f"{n}.key", folder / f"{n}.pub") for n in names]
    _refuse_existing([p for k in keys for p in (k.private_key, k.public_key)], force=force)
    for key in keys:
        private = ec.generate_private_key(ec.SECP384R1())
        private_bytes = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public_bytes = private.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(key.private_key, private_bytes, private=True, force=force)
        _write(
            key.public_key,
            public_bytes + f" fedpeft-{key.name}\n".encode(),
            private=False,
            force=force,
        )
    return keys


COORDINATOR_KEY, COORDINATOR_PUB = "coordinator.key", "coordinator.pub"


def make_coordinator_key(out: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write the coordinator's Ed25519 key pair into ``out``; return (private, public) paths."""
    from fedpeft.privacy.signing import generate_key_pair

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / COORDINATOR_KEY, folder / COORDINATOR_PUB
    _refuse_existing([private, public], force=force)
    generate_key_pair(private, public, force=force)
    return private.resolve(), public.resolve()
