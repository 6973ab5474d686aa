"""Shamir t-of-n secret sharing of short byte strings over the prime field GF(2^521 - 1).

This module owns splitting a secret (a 32-byte self-mask seed or an X25519 private key in
SecAgg+) into shares and reconstructing it from at least ``threshold`` of them. It leaves the
distribution and encryption of shares to :mod:`fedpeft.privacy.secagg`.

Written by hand because ``cryptography`` (the library fedpeft uses for primitives) offers no
secret sharing, and the arithmetic is a few lines of Python integers: a random polynomial of
degree ``threshold - 1`` with the secret as constant term, evaluated at ``x = 1..num_shares``,
and Lagrange interpolation at ``x = 0``. Coefficients come from :mod:`secrets` (a CSPRNG).

The secret is encoded as the integer of ``b"\\x01" + secret`` so that leading zero bytes
survive; with the 521-bit Mersenne prime this allows secrets of up to 64 bytes. Fewer than
``threshold`` shares reveal nothing about the secret, so :func:`reconstruct` refuses them
rather than returning a wrong value; shares beyond the threshold are checked for consistency.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_SECRET_BYTES",
    "PRIME",
    "SHARE_BYTES",
    "Share",
    "ShamirError",
    "reconstruct",
    "share",
]

PRIME = 2**521 - 1  # Mersenne prime; every 64-byte secret plus its marker byte fits below it
MAX_SECRET_BYTES = 64
_INDEX_BYTES = 2  # share indices are 1..65535, far above any neighbourhood size
_VALUE_BYTES = (PRIME.bit_length() + 7) // 8  # 66
SHARE_BYTES = _INDEX_BYTES + _VALUE_BYTES  # 68: the serialised size of one share
_MARKER = b"\x01"


class ShamirError(ValueError):
    """A sharing or reconstruction request that cannot be honoured (the message says why)."""


@dataclass(frozen=True)
class Share:
    """One share: the point ``(index, value)`` on the sharing polynomial.

    Attributes
    ----------
    index : int
        The x coordinate, ``1 <= index <= 65535``.
    value : int
        The y coordinate, ``0 <= value < PRIME``.
    """

    index: int
    value: int

    def __post_init__(self) -> None:
        if not isinstance(self.index, int) or not 1 <= self.index < 2 ** (8 * _INDEX_BYTES):
            raise ShamirError(
                f"share index={self.index!r} is not allowed; it must be an int in "
                f"[1, {2 ** (8 * _INDEX_BYTES) - 1}] (shares come from share())"
            )
        if not isinstance(self.value, int) or not 0 <= self.value < PRIME:
            raise ShamirError(
                "share value is not allowed; it must be an int in [0, 2^521 - 1) "
                "(the share is corrupted or was not made by share())"
            )

    def to_bytes(self) -> bytes:
        """Serialise to exactly ``SHARE_BYTES`` bytes (big-endian index, then value)."""
        return self.index.to_bytes(_INDEX_BYTES, "big") + self.value.to_bytes(_VALUE_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Parse the output of :meth:`to_bytes`.

        Raises
        ------
        ShamirError
            If ``data`` is not ``SHARE_BYTES`` bytes or encodes an invalid share.
        """
        if not isinstance(data, bytes) or len(data) != SHARE_BYTES:
            size = len(data) if isinstance(data, bytes) else type(data).__name__
            raise ShamirError(
                f"a serialised share has {SHARE_BYTES} bytes, got {size} "
                "(pass the exact output of Share.to_bytes())"
            )
        return cls(
            index=int.from_bytes(data[:_INDEX_BYTES], "big"),
            value=int.from_bytes(data[_INDEX_BYTES:], "big"),
        )


def _check_threshold(threshold: int, num_shares: int) -> None:
    if not isinstance(num_shares, int) or not 1 <= num_shares < 2 ** (8 * _INDEX_BYTES):
        raise ShamirError(
            f"num_shares={num_shares!r} is not allowed; it must be an int in "
            f"[1, {2 ** (8 * _INDEX_BYTES) - 1}]"
        )
    if not isinstance(threshold, int) or not 1 <= threshold <= num_shares:
        raise ShamirError(
            f"threshold={threshold!r} is not allowed with num_shares={num_shares}; it must be "
            "an int in [1, num_shares] (lower the threshold or make more shares)"
        )


def share(secret: bytes, *, threshold: int, num_shares: int) -> list[Share]:
    """Split ``secret`` into ``num_shares`` shares, any ``threshold`` of which recover it.

    Parameters
    ----------
    secret : bytes
        At most ``MAX_SECRET_BYTES`` (64) bytes; may be empty or start with zero bytes.
    threshold : int
        How many shares reconstruct the secret, ``1 <= threshold <= num_shares``.
    num_shares : int
        How many shares to make; they get indices ``1..num_shares``.

    Returns
    -------
    list[Share]
        Shares ordered by index.
    """
    if not isinstance(secret, bytes) or len(secret) > MAX_SECRET_BYTES:
        size = len(secret) if isinstance(secret, bytes) else type(secret).__name__
        raise ShamirError(
            f"secret must be bytes of length <= {MAX_SECRET_BYTES}, got {size} "
            "(share a 32-byte key or seed, not the data itself)"
        )
    _check_threshold(threshold, num_shares)
    coefficients = [int.from_bytes(_MARKER + secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, num_shares + 1):
        y = 0
        for coefficient in reversed(coefficients):  # Horner's rule
            y = (y * x + coefficient) % PRIME
        shares.append(Share(index=x, value=y))
    return shares


def _interpolate(points: Sequence[Share], x: int) -> int:
    """Evaluate at ``x`` the unique polynomial of degree < len(points) through ``points``."""
    result = 0
    for j, point_j in enumerate(points):
        numerator, denominator = 1, 1
        for m, point_m in enumerate(points):
            if m != j:
                numerator = numerator * (x - point_m.index) % PRIME
                denominator = denominator * (point_j.index - point_m.index) % PRIME
        result = (result + point_j.value * numerator * pow(denominator, -1, PRIME)) % PRIME
    return result


def reconstruct(shares: Sequence[Share], *, threshold: int) -> bytes:
    """Recover the secret from at least ``threshold`` shares.

    The first ``threshold`` shares (by index) determine the polynomial; any further shares
    must lie on it, which detects corrupted or mixed-up shares.

    Parameters
    ----------
    shares : Sequence[Share]
        Shares with distinct indices, ``len(shares) >= threshold``.
    threshold : int
        The threshold the secret was shared with.

    Returns
    -------
    bytes
        The secret.

    Raises
    ------
    ShamirError
        With fewer than ``threshold`` shares, duplicate indices, inconsistent shares or a
        result that is not a valid encoded secret.
    """
    if not isinstance(threshold, int) or threshold < 1:
        raise ShamirError(f"threshold={threshold!r} is not allowed; it must be an int >= 1")
    if len(shares) < threshold:
        raise ShamirError(
            f"got {len(shares)} share(s) but threshold={threshold}; at least {threshold} are "
            "needed (fewer reveal nothing about the secret; collect more shares)"
        )
    indices = [s.index for s in shares]
    if len(set(indices)) != len(indices):
        duplicated = sorted({i for i in indices if indices.count(i) > 1})
        raise ShamirError(
            f"duplicate share indices {duplicated}; each share must come from a different "
            "holder (drop the repeated shares)"
        )
    ordered = sorted(shares, key=lambda s: s.index)
    basis, extra = ordered[:threshold], ordered[threshold:]
    for point in extra:
        if _interpolate(basis, point.index) != point.value:
            raise ShamirError(
                f"share with index {point.index} is inconsistent with the others; the shares "
                "are corrupted or belong to different secrets"
            )
    encoded = _interpolate(basis, 0)
    data = encoded.to_bytes((encoded.bit_length() + 7) // 8, "big")
    if not data.startswith(_MARKER) or len(data) > MAX_SECRET_BYTES + 1:
        raise ShamirError(
            "the reconstructed value is not a valid secret; the shares are corrupted, belong to "
            "different secrets or were made with a higher threshold"
        )
    return data[1:]
