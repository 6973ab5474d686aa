"""Cryptographic helpers for secure aggregation, built only from ``cryptography`` primitives.

This module owns the four primitives SecAgg+ needs and nothing else:

* X25519 key pairs (:func:`generate_private_key`, :func:`public_key_bytes`, ...);
* key agreement: X25519 ECDH followed by HKDF-SHA256 with a context string that binds the
  purpose, the round and the (unordered) pair of node ids (:func:`derive_shared_key`);
* a pseudo-random generator that expands a 32-byte seed into a uint32 vector with the ChaCha20
  stream cipher (:func:`prg_uint32`);
* authenticated encryption of share payloads with AES-256-GCM, with associated data that binds
  the round, the sender and the recipient (:func:`encrypt`, :func:`decrypt`);

and the two keys a pair of nodes derives from them each round: the seed of their pairwise mask
(:func:`pair_mask`) and the key of the shares one sends the other (:func:`share_key`).

No primitive is invented here, and neither numpy's nor Python's ``random`` generators are used
for anything secret (Flower's own SecAgg+ draws masks from ``numpy.random.RandomState`` seeded
with 32 bits, which is why fedpeft does not reuse it). The protocol that combines these
primitives lives in :mod:`fedpeft.privacy.secagg`.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

__all__ = [
    "KEY_BYTES",
    "CryptoError",
    "associated_data",
    "check_public_key",
    "decrypt",
    "derive_shared_key",
    "encrypt",
    "generate_private_key",
    "key_info",
    "load_private_key",
    "pair_mask",
    "prg_uint32",
    "private_key_bytes",
    "public_key_bytes",
    "share_key",
]

KEY_BYTES = 32  # X25519 keys, HKDF outputs, ChaCha20 and AES-256 keys are all 32 bytes
_NONCE_BYTES = 12  # AES-GCM nonce, random per message (96 bits, as NIST SP 800-38D recommends)
_PROTOCOL = b"fedpeft-secagg-v1"
_ID_BYTES = 8  # node and round ids are unsigned 64-bit integers (Flower node ids are uint64)
# ChaCha20 in `cryptography` takes a 16-byte nonce: a 4-byte block counter and a 12-byte nonce.
# Every PRG seed is used for one stream only (a fresh self-mask seed per round, a pairwise key
# derived with the round in its HKDF info), so a fixed all-zero nonce is safe.
_PRG_NONCE = bytes(16)


class CryptoError(ValueError):
    """A key, ciphertext or parameter that the primitives reject (the message says why)."""


def _id_bytes(name: str, value: int) -> bytes:
    if not isinstance(value, int) or not 0 <= value < 2 ** (8 * _ID_BYTES):
        raise CryptoError(f"{name}={value!r} is not allowed; it must be an int in [0, 2^64)")
    return value.to_bytes(_ID_BYTES, "big")


def _check_key(name: str, key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        size = len(key) if isinstance(key, bytes) else type(key).__name__
        raise CryptoError(f"{name} must be {KEY_BYTES} bytes, got {size}")


def generate_private_key() -> X25519PrivateKey:
    """Return a fresh X25519 private key (from the operating system's CSPRNG)."""
    return X25519PrivateKey.generate()


def public_key_bytes(private_key: X25519PrivateKey) -> bytes:
    """Return the 32-byte raw public key that belongs to ``private_key``."""
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def private_key_bytes(private_key: X25519PrivateKey) -> bytes:
    """Return the 32-byte raw private key (to secret-share it or keep it in site state)."""
    return private_key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )


def load_private_key(data: bytes) -> X25519PrivateKey:
    """Load a private key from the 32 raw bytes written by :func:`private_key_bytes`."""
    _check_key("private key", data)
    return X25519PrivateKey.from_private_bytes(data)


def check_public_key(data: bytes) -> None:
    """Check that ``data`` is a usable raw X25519 public key.

    Raises
    ------
    CryptoError
        If ``data`` is not 32 bytes, or is a low-order point, which would make every shared
        secret with it all-zero (detected by a trial agreement with a throwaway key).
    """
    _check_key("public key", data)
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(data))
    except ValueError as error:
        raise CryptoError(f"public key is a low-order point and cannot be used: {error}") from error


def key_info(purpose: str, *, round_id: int, node_a: int, node_b: int) -> bytes:
    """Build the HKDF ``info`` string for a key shared by two nodes in one round.

    The pair is unordered (both nodes derive the same key), and the purpose separates keys
    derived from the same ECDH secret for different uses.

    Parameters
    ----------
    purpose : str
        ``"share-encryption"`` or ``"pairwise-mask"`` in SecAgg+; any ASCII label works.
    round_id, node_a, node_b : int
        Unsigned 64-bit ids.
    """
    low, high = sorted((node_a, node_b))
    return b"|".join(
        (
            _PROTOCOL,
            purpose.encode("ascii"),
            _id_bytes("round_id", round_id),
            _id_bytes("node id", low),
            _id_bytes("node id", high),
        )
    )


def derive_shared_key(
    private_key: X25519PrivateKey, peer_public_key: bytes, *, info: bytes
) -> bytes:
    """X25519 ECDH with a peer, then HKDF-SHA256 to a 32-byte key bound to ``info``.

    Parameters
    ----------
    private_key : X25519PrivateKey
        Our private key.
    peer_public_key : bytes
        The peer's 32-byte raw public key.
    info : bytes
        Context string, normally from :func:`key_info`.

    Raises
    ------
    CryptoError
        If the peer key has the wrong size or is a low-order point (all-zero shared secret).
    """
    _check_key("peer public key", peer_public_key)
    try:
        secret = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    except ValueError as error:  # raised for low-order points that give an all-zero secret
        message = f"key agreement failed: {error} (the peer sent an invalid public key)"
        raise CryptoError(message) from error
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def prg_uint32(seed: bytes, length: int) -> NDArray[np.uint32]:
    """Expand a 32-byte seed into ``length`` pseudo-random uint32 values with ChaCha20.

    The output is the ChaCha20 key stream (zeros encrypted under ``seed`` with a fixed nonce),
    read as little-endian uint32, so it is identical on every platform. Each seed must be used
    for a single stream (see the module constant ``_PRG_NONCE``). About 2 ms per million values
    on one core.

    Parameters
    ----------
    seed : bytes
        32-byte key, secret and used once.
    length : int
        Number of uint32 values, ``>= 0``.

    Returns
    -------
    NDArray[np.uint32]
        Writable array of shape ``(length,)``.
    """
    _check_key("seed", seed)
    if not isinstance(length, int) or length < 0:
        raise CryptoError(f"length={length!r} is not allowed; it must be an int >= 0")
    encryptor = Cipher(algorithms.ChaCha20(seed, _PRG_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(4 * length))  # 4 bytes per uint32
    return np.frombuffer(bytearray(stream), dtype="<u4").astype(np.uint32, copy=False)


def associated_data(purpose: str, *, round_id: int, sender: int, recipient: int) -> bytes:
    """Build AES-GCM associated data binding a payload to its round and direction."""
    return b"|".join(
        (
            _PROTOCOL,
            purpose.encode("ascii"),
            _id_bytes("round_id", round_id),
            _id_bytes("sender", sender),
            _id_bytes("recipient", recipient),
        )
    )


def encrypt(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """Encrypt with AES-256-GCM; returns ``nonce (12 bytes) || ciphertext || tag (16 bytes)``."""
    _check_key("encryption key", key)
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, ciphertext: bytes, *, associated_data: bytes) -> bytes:
    """Decrypt the output of :func:`encrypt`.

    Raises
    ------
    CryptoError
        If the ciphertext was altered, was encrypted under another key, or ``associated_data``
        differs (wrong round, sender or recipient).
    """
    _check_key("encryption key", key)
    if not isinstance(ciphertext, bytes) or len(ciphertext) < _NONCE_BYTES + 16:
        raise CryptoError("ciphertext is too short to hold an AES-GCM nonce and tag")
    try:
        return AESGCM(key).decrypt(
            ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], associated_data
        )
    except InvalidTag as error:
        raise CryptoError(
            "authentication failed: the ciphertext was altered, or is for another key, round, "
            "sender or recipient"
        ) from error


# --- the two keys of a pair of nodes ----------------------------------------------------------
SHARE_KEY_PURPOSE = "share-encryption"  # HKDF purpose of the key that encrypts shares
MASK_KEY_PURPOSE = "pairwise-mask"  # HKDF purpose of the key that seeds a pairwise mask


def pair_mask(
    private_key: bytes, peer_key: bytes, *, round_id: int, a: int, b: int, length: int
) -> NDArray[np.uint32]:
    """Pairwise mask of ``a`` and ``b``: ChaCha20 keyed by HKDF(ECDH), ``length`` uint32."""
    info = key_info(MASK_KEY_PURPOSE, round_id=round_id, node_a=a, node_b=b)
    key = derive_shared_key(load_private_key(private_key), peer_key, info=info)
    return prg_uint32(key, length)


def share_key(private_key: bytes, peer_key: bytes, *, round_id: int, a: int, b: int) -> bytes:
    """AES-GCM key for the shares node ``a`` sends to ``b`` (ECDH, HKDF bound to the round)."""
    info = key_info(SHARE_KEY_PURPOSE, round_id=round_id, node_a=a, node_b=b)
    return derive_shared_key(load_private_key(private_key), peer_key, info=info)
