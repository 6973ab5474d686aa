"""What a release is bound to: one digest of everything that shapes it, and the keys it seeds.

A site's DP release (its noisy update) is determined by its inputs: the global adapter it
starts from, the tensors it trains, the federation and round, and every setting that
changes the computation (train, privacy, model, data, LoRA, secure aggregation, the site's
own rank, device and data file). This module turns those inputs into one SHA-256 digest,
the *binding*, and derives from it, with the site's secret, the key of the round's
randomness. Two consequences, which together stop a coordinator from cancelling noise by
replaying a round:

- the same inputs give the same binding, the same randomness and so the same release: a
  retried round (a crash) is repeated exactly and charged once;
- any difference gives another binding, hence fresh, independent randomness *and* a fresh
  ledger charge (the ledger keys its entries by the binding, :mod:`fedpeft.privacy.ledger`).

Written here because no library binds DP randomness to a request: Opacus takes a generator,
not a policy. The digest is of canonical JSON (sorted keys, no whitespace, floats as
``repr``), so equal settings on two machines give equal digests.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Mapping, Sequence
from typing import Final

__all__ = [
    "BINDING_VERSION",
    "adapter_digest",
    "canonical_json",
    "release_binding",
    "release_key",
    "release_seed",
]

#: Changes whenever the fields that enter a binding change.
BINDING_VERSION: Final[int] = 1
_KEY_LABEL: Final[bytes] = b"fedpeft/release-key/v1/"


def _canonical(value: object) -> object:
    """``value`` with floats made exact and every container made JSON-plain."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)  # 'inf' / 'nan': JSON has no such numbers
        return float.hex(value)  # exact: 0.1 and 0.1000000000000001 differ
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    raise TypeError(f"cannot bind a value of type {type(value).__name__}: {value!r}")


def canonical_json(value: object) -> bytes:
    """``value`` as canonical JSON bytes (sorted keys, compact, floats in hex)."""
    return json.dumps(_canonical(value), sort_keys=True, separators=(",", ":")).encode()


def adapter_digest(data: bytes) -> str:
    """SHA-256 (hex) of an adapter's raw float32 bytes."""
    return hashlib.sha256(data).hexdigest()


def release_binding(
    *,
    federation_id: str,
    round_number: int,
    task: str,
    adapter_sha256: str,
    trained_names: Sequence[str],
    settings: Mapping[str, object],
) -> str:
    """The digest (hex SHA-256) of everything that determines one release.

    Parameters
    ----------
    federation_id : str
        The federation's id as the server sent it.
    round_number : int
        The round.
    task : str
        What is released (``"train"`` or ``"evaluate"``).
    adapter_sha256 : str
        :func:`adapter_digest` of the global adapter the site starts from, as it rebuilt it.
    trained_names : sequence of str
        The adapter tensors it trains, in order.
    settings : mapping
        Every setting the site will use (its resolved configuration, its DP plan and its own
        node settings); nested mappings, lists and scalars.

    Returns
    -------
    str
        64 hex characters.
    """
    document = {
        "binding": BINDING_VERSION,
        "federation_id": federation_id,
        "round": round_number,
        "task": task,
        "adapter_sha256": adapter_sha256,
        "trained_names": list(trained_names),
        "settings": settings,
    }
    return hashlib.sha256(canonical_json(document)).hexdigest()


def release_key(secret: bytes, binding: str) -> bytes:
    """The 32-byte key of a release's randomness: HMAC-SHA256(site secret, binding).

    Known only to the site (it holds the secret); equal for equal bindings, independent for
    different ones.
    """
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise ValueError("the site secret must be at least 16 bytes")
    return hmac.new(secret, _KEY_LABEL + binding.encode(), hashlib.sha256).digest()


def release_seed(key: bytes) -> int:
    """A 63-bit integer seed from a release key, for randomness that protects nothing
    (shuffling of non-private training, LoRA dropout)."""
    return int.from_bytes(hashlib.sha256(b"seed/" + key).digest()[:8], "big") >> 1
