"""SecAgg+ vocabulary: errors, stages, the message dataclasses and the neighbour graph.

This module owns what the two state machines of :mod:`fedpeft.privacy.secagg` exchange (frozen
dataclasses of ints, bytes, ``Mapping[int, bytes]`` and uint32 arrays), the errors they raise,
the default graph parameters and the random ``k``-regular neighbour graph, plus the few
cryptographic helpers both sides share (key derivation for pairwise masks and share
encryption). The node's side is :mod:`fedpeft.privacy.secagg_client`, the server's
:mod:`fedpeft.privacy.secagg_server`; how a message is flattened for a transport is
:mod:`fedpeft.privacy.secagg_wire`. The protocol itself is described in
:mod:`fedpeft.privacy.secagg`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedpeft.privacy import masking, shamir
from fedpeft.privacy.quantize import QuantizationParams

__all__ = [
    "EncryptedShares",
    "MaskedVector",
    "MaskedVectorRequest",
    "PublicKeys",
    "SecAggAbort",
    "SecAggConfigError",
    "SecAggError",
    "SecAggProtocolError",
    "SecAggResult",
    "SetupRequest",
    "ShareKeysRequest",
    "Stage",
    "UnmaskRequest",
    "UnmaskShares",
    "build_neighbour_graph",
    "default_num_neighbours",
    "default_threshold",
]

# Protocol constants and the helpers below the graph are shared by secagg_client and
# secagg_server; they are not part of the public API (not in __all__).
SHARE_KEY_PURPOSE = "share-encryption"  # HKDF purpose of the key that encrypts shares
MASK_KEY_PURPOSE = "pairwise-mask"  # HKDF purpose of the key that seeds a pairwise mask
SHARES_AD_PURPOSE = "shares"  # AES-GCM associated-data purpose of a share payload
PAYLOAD_BYTES = 2 * shamir.SHARE_BYTES  # share of b_i || share of s_i
CIPHERTEXT_BYTES = 12 + PAYLOAD_BYTES + 16  # AES-GCM nonce + payload + tag


class SecAggError(Exception):
    """Base class of every secure-aggregation error."""


class SecAggConfigError(SecAggError, ValueError):
    """Invalid parameters or local input (threshold, neighbours, ids, update shape)."""


class SecAggProtocolError(SecAggError):
    """A message that breaks the protocol: wrong round, unknown or duplicate sender, wrong
    stage, wrong size, failed authentication, or a request that would reveal too much."""


class SecAggAbort(SecAggError):
    """The round cannot finish (too few nodes left to reconstruct the masks); discard it."""


class Stage(StrEnum):
    """Protocol stages; a state machine is in the stage whose replies it awaits."""

    INIT = "init"
    SETUP = "setup"
    SHARE_KEYS = "share_keys"
    COLLECT_MASKED_VECTORS = "collect_masked_vectors"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True)
class SetupRequest:
    """Server → node, stage setup: the round's parameters and the node's neighbours."""

    round_id: int
    node_id: int
    neighbours: tuple[int, ...]
    threshold: int
    vector_length: int
    quantization: QuantizationParams


@dataclass(frozen=True)
class PublicKeys:
    """Node → server, stage setup: raw X25519 public keys (32 bytes each)."""

    round_id: int
    node_id: int
    encryption_key: bytes
    mask_key: bytes


@dataclass(frozen=True)
class ShareKeysRequest:
    """Server → node, stage share_keys: public keys of the neighbours still in the round."""

    round_id: int
    node_id: int
    encryption_keys: Mapping[int, bytes]
    mask_keys: Mapping[int, bytes]


@dataclass(frozen=True)
class EncryptedShares:
    """Node → server, stage share_keys: one ciphertext per neighbour, keyed by recipient."""

    round_id: int
    node_id: int
    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True)
class MaskedVectorRequest:
    """Server → node, stage collect_masked_vectors: ciphertexts for the node, keyed by sender."""

    round_id: int
    node_id: int
    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True, eq=False)
class MaskedVector:
    """Node → server, stage collect_masked_vectors: uint32 vector of shape ``(L,)``."""

    round_id: int
    node_id: int
    vector: NDArray[np.uint32]


@dataclass(frozen=True)
class UnmaskRequest:
    """Server → node, stage unmask: whose ``b`` shares (survived) and ``s`` shares (dropped)."""

    round_id: int
    node_id: int
    survived: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class UnmaskShares:
    """Node → server, stage unmask: serialised Shamir shares keyed by the owner's node id."""

    round_id: int
    node_id: int
    self_mask_shares: Mapping[int, bytes]
    mask_key_shares: Mapping[int, bytes]


@dataclass(frozen=True, eq=False)
class SecAggResult:
    """The unmasked sum over the included nodes.

    Attributes
    ----------
    total : NDArray[np.float64]
        Dequantised sum, shape ``(L,)``.
    quantized_total : NDArray[np.uint32]
        The sum in the ring Z_{2^32} before dequantisation.
    included : tuple[int, ...]
        Nodes whose vectors are in the sum (sorted).
    dropped : tuple[int, ...]
        Participants whose vectors are not (sorted).
    """

    total: NDArray[np.float64]
    quantized_total: NDArray[np.uint32]
    included: tuple[int, ...]
    dropped: tuple[int, ...]


def default_num_neighbours(num_nodes: int) -> int:
    """Neighbours per node: all others for small rounds, else ``2 * ceil(log2 n) + 2``.

    A heuristic in the spirit of Bell et al. (``k = O(log n)``); the constant their security
    analysis needs depends on the expected dropout and corruption rates, so set
    ``num_neighbours`` explicitly for a specific threat model.
    """
    return min(num_nodes - 1, 2 * math.ceil(math.log2(max(num_nodes, 2))) + 2)


def default_threshold(num_neighbours: int) -> int:
    """Smallest threshold above half of the ``k + 1`` share holders (node and neighbours)."""
    return (num_neighbours + 1) // 2 + 1


def build_neighbour_graph(
    node_ids: Sequence[int], *, num_neighbours: int
) -> dict[int, tuple[int, ...]]:
    """Random ``num_neighbours``-regular graph: a Harary graph over a secret random ordering.

    Nodes are placed on a ring in an order drawn with :mod:`secrets`; each is linked to the
    ``k // 2`` nearest nodes on either side, and for odd ``k`` (even ``n``) to the opposite node.

    Returns
    -------
    dict[int, tuple[int, ...]]
        Each node's sorted neighbours (symmetric, never the node itself).
    """
    order = list(node_ids)
    secrets.SystemRandom().shuffle(order)
    n = len(order)
    adjacency: dict[int, set[int]] = {node: set() for node in order}
    offsets = list(range(1, num_neighbours // 2 + 1)) + ([n // 2] if num_neighbours % 2 else [])
    for position, node in enumerate(order):
        for offset in offsets:
            other = order[(position + offset) % n]
            adjacency[node].add(other)
            adjacency[other].add(node)
    return {node: tuple(sorted(adjacency[node])) for node in sorted(order)}


# -- protocol internals shared by the client and the server ------------------------------


def check_id(name: str, value: object, *, error: type[SecAggError] = SecAggConfigError) -> int:
    """``value`` as a node or round id (an int in ``[0, 2^64)``), else raise ``error``."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64:
        raise error(f"{name}={value!r} is not allowed; it must be an int in [0, 2^64)")
    return value


def graph_problems(num_nodes: int, num_neighbours: int, threshold: int) -> list[str]:
    """Every problem with a graph of ``num_nodes`` nodes, degree and threshold (empty: valid)."""
    problems = []
    if num_nodes < 2:
        problems.append(f"{num_nodes} node(s) given; secure aggregation needs at least 2")
    if not isinstance(num_neighbours, int) or not 1 <= num_neighbours <= max(num_nodes - 1, 1):
        problems.append(
            f"num_neighbours={num_neighbours!r} is not allowed; it must be an int in "
            f"[1, {max(num_nodes - 1, 1)}] (number of nodes - 1), e.g. "
            f"{default_num_neighbours(max(num_nodes, 2))}"
        )
    elif num_neighbours % 2 and num_nodes % 2:
        problems.append(
            f"num_neighbours={num_neighbours} is odd and the number of nodes {num_nodes} is odd; "
            "no such regular graph exists (use an even num_neighbours)"
        )
    holders = num_neighbours + 1 if isinstance(num_neighbours, int) else 0
    if not isinstance(threshold, int) or not holders / 2 < threshold <= holders:
        problems.append(
            f"threshold={threshold!r} is not allowed with {holders} share holders (the node and "
            f"its num_neighbours); it must be an int with holders/2 < threshold <= holders, so "
            f"the server can never gather both kinds of shares of one node (e.g. "
            f"{default_threshold(max(holders - 1, 1))})"
        )
    return problems


def share_holders(node: int, neighbours: Sequence[int]) -> tuple[int, ...]:
    """Share holders of ``node``; the share index of a holder is its position here plus one."""
    return tuple(sorted({node, *neighbours}))


def pair_mask(
    private_key: bytes, peer_key: bytes, *, round_id: int, a: int, b: int, length: int
) -> NDArray[np.uint32]:
    """Pairwise mask of ``a`` and ``b``: ChaCha20 keyed by HKDF(ECDH), ``length`` uint32."""
    info = masking.key_info(MASK_KEY_PURPOSE, round_id=round_id, node_a=a, node_b=b)
    key = masking.derive_shared_key(masking.load_private_key(private_key), peer_key, info=info)
    return masking.prg_uint32(key, length)


def share_key(private_key: bytes, peer_key: bytes, *, round_id: int, a: int, b: int) -> bytes:
    """AES-GCM key for the shares node ``a`` sends to ``b`` (ECDH, HKDF bound to the round)."""
    info = masking.key_info(SHARE_KEY_PURPOSE, round_id=round_id, node_a=a, node_b=b)
    return masking.derive_shared_key(masking.load_private_key(private_key), peer_key, info=info)


def check_message(msg: Any, *, round_id: int, node_id: int | None) -> None:
    """Raise :class:`SecAggProtocolError` unless ``msg`` is for ``round_id`` (and ``node_id``)."""
    if msg.round_id != round_id:
        raise SecAggProtocolError(
            f"{type(msg).__name__} from node {msg.node_id} is for round {msg.round_id!r}, but "
            f"round {round_id} is in progress (a late or replayed message; drop it)"
        )
    if node_id is not None and msg.node_id != node_id:
        raise SecAggProtocolError(
            f"{type(msg).__name__} is addressed to node {msg.node_id!r}, but this is node "
            f"{node_id} (route messages by node id)"
        )


def check_keys(name: str, keys: Mapping[int, bytes]) -> None:
    """Raise :class:`SecAggProtocolError` unless every value is a valid X25519 public key."""
    for node, key in keys.items():
        try:
            masking.check_public_key(key)
        except masking.CryptoError as error:
            raise SecAggProtocolError(f"{name} of node {node}: {error}") from error
