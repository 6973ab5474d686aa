"""Coordinator-signed instructions: a site trains only for a coordinator it trusts.

Flower 1.41's Control API (which accepts ``flwr run``) shares the SuperLink's port and has no
authentication: anyone who can reach the port can submit a run and make every connected
site train and spend privacy budget. So the ServerApp signs each instruction that makes a
site release something (train, evaluate) with the coordinator's Ed25519 key, and a site
whose node config names ``coordinator-public-key`` refuses, before charging anything, an
instruction that does not carry a valid signature by that key.

What is signed is the SHA-256 of canonical JSON (:func:`fedpeft.privacy.binding.canonical_json`)
of the instruction: federation id, round, task, the trained tensor names, the digest of the
adapter values as sent, the broadcast's names and derived digest, and the digest of the
resolved configuration. A valid signature binds all of them; changing one (another adapter,
another setting) invalidates it.

Ed25519 from ``cryptography``; keys in PEM (PKCS#8 private, SubjectPublicKeyInfo public).
Written here because Flower signs nothing at the application level.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedpeft.privacy.binding import canonical_json

__all__ = [
    "SignatureError",
    "generate_key_pair",
    "instruction_digest",
    "load_private_key",
    "load_public_key",
    "sign_instruction",
    "verify_instruction",
]

SIGNATURE_BYTES: Final[int] = 64
_DOMAIN: Final[str] = "fedpeft-instruction/v1"


class SignatureError(Exception):
    """An instruction is unsigned, or its signature does not verify with the trusted key."""


def instruction_digest(fields: Mapping[str, object]) -> bytes:
    """SHA-256 of the canonical JSON of an instruction's fields (with a domain label)."""
    return hashlib.sha256(canonical_json({"domain": _DOMAIN, **fields})).digest()


def sign_instruction(key: Ed25519PrivateKey, fields: Mapping[str, object]) -> bytes:
    """The coordinator's 64-byte Ed25519 signature of :func:`instruction_digest`."""
    return key.sign(instruction_digest(fields))


def verify_instruction(
    key: Ed25519PublicKey, fields: Mapping[str, object], signature: object
) -> None:
    """Raise :class:`SignatureError` unless ``signature`` signs ``fields`` under ``key``."""
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise SignatureError(
            "the instruction carries no coordinator signature (or a malformed one); this site "
            "trains only for the coordinator whose public key its node config names"
        )
    try:
        key.verify(signature, instruction_digest(fields))
    except InvalidSignature:
        raise SignatureError(
            "the instruction's signature does not verify with the coordinator public key in "
            "this site's node config: it was not signed by that coordinator, or was altered"
        ) from None


def generate_key_pair(private_path: Path, public_path: Path, *, force: bool = False) -> None:
    """Write a new Ed25519 key pair: the private key with mode 0600, the public key 0644."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for path, data, mode in ((private_path, private, 0o600), (public_path, public, 0o644)):
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
        fd = os.open(path, flags, mode)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The coordinator's Ed25519 private key from a PEM file."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise SignatureError(
            f"cannot read the coordinator key {str(path)!r}: {error}. Make one with "
            "`fedpeft keys --coordinator --out DIR`."
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(
            f"{str(path)!r} is a {type(key).__name__}, not an Ed25519 private key; make one "
            "with `fedpeft keys --coordinator --out DIR`."
        )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A coordinator's Ed25519 public key from a PEM file."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as error:
        raise SignatureError(
            f"cannot read the coordinator public key {str(path)!r}: {error}. Ask the "
            "coordinator for its coordinator.pub."
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(
            f"{str(path)!r} holds a {type(key).__name__}, not an Ed25519 public key"
        )
    return key
