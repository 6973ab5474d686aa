"""Crypto helpers: X25519 + HKDF agreement, the ChaCha20 PRG, AES-GCM share encryption."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.privacy import masking
from fedpeft.privacy.masking import CryptoError

# RFC 8439, appendix A.1, test vector #1: ChaCha20 block with an all-zero key and nonce,
# block counter 0; the key stream is the PRG output for a zero seed.
_RFC8439_A1_BLOCK = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
)


def test_prg_matches_the_chacha20_known_answer() -> None:
    stream = masking.prg_uint32(bytes(32), 16)
    assert stream.dtype == np.uint32 and stream.shape == (16,)
    assert stream.astype("<u4").tobytes() == _RFC8439_A1_BLOCK


@settings(max_examples=20, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), length=st.integers(min_value=0, max_value=5000))
def test_prg_is_deterministic_and_prefix_consistent(seed: bytes, length: int) -> None:
    long = masking.prg_uint32(seed, length + 7)
    np.testing.assert_array_equal(masking.prg_uint32(seed, length), long[:length])


def test_prg_output_looks_uniform_and_depends_on_the_seed() -> None:
    first = masking.prg_uint32(b"\x01" * 32, 200_000)
    second = masking.prg_uint32(b"\x02" * 32, 200_000)
    assert not np.array_equal(first, second)
    # mean of uniform uint32 is 2^31 - 0.5 with standard error 2^32 / sqrt(12 * 200_000)
    assert abs(first.astype(np.float64).mean() - 2**31) < 6 * 2**32 / np.sqrt(12 * 200_000)
    first += 1  # writable
    with pytest.raises(CryptoError, match="seed must be 32 bytes, got 16"):
        masking.prg_uint32(bytes(16), 4)
    with pytest.raises(CryptoError, match="length=-1"):
        masking.prg_uint32(bytes(32), -1)


def test_key_agreement_is_symmetric_and_bound_to_its_context() -> None:
    alice, bob = masking.generate_private_key(), masking.generate_private_key()
    info = masking.key_info("pairwise-mask", round_id=3, node_a=10, node_b=2)
    assert info == masking.key_info("pairwise-mask", round_id=3, node_a=2, node_b=10)
    key_ab = masking.derive_shared_key(alice, masking.public_key_bytes(bob), info=info)
    key_ba = masking.derive_shared_key(bob, masking.public_key_bytes(alice), info=info)
    assert key_ab == key_ba and len(key_ab) == 32
    for other in (
        masking.key_info("share-encryption", round_id=3, node_a=2, node_b=10),
        masking.key_info("pairwise-mask", round_id=4, node_a=2, node_b=10),
        masking.key_info("pairwise-mask", round_id=3, node_a=2, node_b=11),
    ):
        assert masking.derive_shared_key(alice, masking.public_key_bytes(bob), info=other) != key_ab


def test_private_key_round_trip_and_invalid_keys() -> None:
    key = masking.generate_private_key()
    raw = masking.private_key_bytes(key)
    assert len(raw) == 32
    restored = masking.load_private_key(raw)
    assert masking.public_key_bytes(restored) == masking.public_key_bytes(key)
    with pytest.raises(CryptoError, match="peer public key must be 32 bytes, got 31"):
        masking.derive_shared_key(key, bytes(31), info=b"x")
    with pytest.raises(CryptoError, match="key agreement failed"):
        masking.derive_shared_key(key, bytes(32), info=b"x")  # a low-order point
    masking.check_public_key(masking.public_key_bytes(key))
    with pytest.raises(CryptoError, match="low-order point"):
        masking.check_public_key(bytes(32))
    with pytest.raises(CryptoError, match="public key must be 32 bytes, got 33"):
        masking.check_public_key(bytes(33))
    with pytest.raises(CryptoError, match="round_id=-1"):
        masking.key_info("x", round_id=-1, node_a=0, node_b=1)


def test_encryption_round_trip_and_binding() -> None:
    key = b"k" * 32
    ad = masking.associated_data("shares", round_id=1, sender=5, recipient=6)
    ciphertext = masking.encrypt(key, b"payload", associated_data=ad)
    assert len(ciphertext) == 12 + len(b"payload") + 16
    assert masking.decrypt(key, ciphertext, associated_data=ad) == b"payload"
    assert masking.encrypt(key, b"payload", associated_data=ad) != ciphertext  # fresh nonce
    wrong_contexts = [
        masking.associated_data("shares", round_id=2, sender=5, recipient=6),
        masking.associated_data("shares", round_id=1, sender=6, recipient=5),
        masking.associated_data("shares", round_id=1, sender=5, recipient=7),
    ]
    for wrong in wrong_contexts:
        with pytest.raises(CryptoError, match="authentication failed"):
            masking.decrypt(key, ciphertext, associated_data=wrong)
    tampered = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
    with pytest.raises(CryptoError, match="authentication failed"):
        masking.decrypt(key, tampered, associated_data=ad)
    with pytest.raises(CryptoError, match="authentication failed"):
        masking.decrypt(b"j" * 32, ciphertext, associated_data=ad)
    with pytest.raises(CryptoError, match="too short"):
        masking.decrypt(key, b"short", associated_data=ad)
