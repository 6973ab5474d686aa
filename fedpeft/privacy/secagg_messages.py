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
from fractions import Fraction
from functools import lru_cache
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


# -- graph parameters ----------------------------------------------------------------------
#
# The defaults follow the Harary-graph analysis of Bell et al. (CCS 2020) in the form that
# Google's implementation of it uses (google-parfait/federated-compute,
# fcp/secagg/server/graph_parameter_finder.cc: HararyGraphParameterFinder), with one change:
# the threshold must also exceed half of a node's k + 1 share holders (the invariant that
# SecAggClient enforces, so that a server that asks different holders for different kinds of
# shares can never gather both kinds of one node). The paper's own theorem was not at hand
# when this was written: the three conditions below (honest survivors connected, fewer than
# t corrupt neighbours, at least t surviving neighbours, each by a union bound over nodes or
# gap pairs) are those of the reference implementation, whose published test values
# (tests/privacy/test_secagg.py) this code reproduces.

CORRUPT_FRACTION = Fraction(1, 3)  # γ: sites that may collude with the coordinator
DROPOUT_FRACTION = Fraction(1, 3)  # δ: sites that may drop out of one round
SECURITY_BITS = 40  # σ: a bad graph (privacy at risk) has probability < 2^-40
CORRECTNESS_BITS = 20  # η: a round aborts for lack of shares with probability < 2^-20


@dataclass(frozen=True)
class GraphParameters:
    """Degree and threshold for ``num_nodes`` nodes, and whether they meet the bound.

    Attributes
    ----------
    num_nodes, num_neighbours, threshold : int
        ``n``, ``k`` and ``t``.
    meets_bound : bool
        False where no ``k <= n - 1`` meets the bound (a few nodes, many expected dropouts):
        then ``k = n - 1`` (the complete graph, the most tolerant choice) is returned.
    """

    num_nodes: int
    num_neighbours: int
    threshold: int
    meets_bound: bool


def _hypergeometric_weights(total: int, marked: int, sampled: int) -> list[int]:
    """``C(marked, x) * C(total - marked, sampled - x)`` for ``x = 0..sampled``.

    Their sum is ``C(total, sampled)``: weight ``x`` over the sum is the probability that a
    uniform sample of ``sampled`` of ``total`` items holds exactly ``x`` of the ``marked``
    ones. Exact integers, so the tail bounds below are compared without rounding.
    """
    return [
        math.comb(marked, x) * math.comb(total - marked, sampled - x) for x in range(sampled + 1)
    ]


@lru_cache(maxsize=4096)
def _threshold_bounds(
    num_nodes: int,
    num_neighbours: int,
    corrupt_fraction: Fraction,
    dropout_fraction: Fraction,
    security_bits: int,
    correctness_bits: int,
) -> tuple[int, int]:
    """``(lowest, highest)`` threshold that the bound allows for ``n`` nodes and degree ``k``.

    ``lowest``: the smallest ``t`` with Pr[a node has ``>= t`` corrupt neighbours] <=
    2^-(σ+1) / n (a union bound over nodes: then no coalition holds ``t`` shares of an honest
    node), and above half of the ``k + 1`` holders. ``highest``: the largest ``t`` with
    Pr[a node has ``< t`` surviving neighbours] <= 2^-η / n. The neighbours of a node are a
    uniform ``k``-subset (the ring order is a uniform permutation), so both counts are
    hypergeometric over the ``n`` nodes, with ``floor(γ n)`` corrupt and ``ceil((1 - δ) n)``
    surviving nodes, as in the reference implementation. ``lowest > highest``: no threshold.
    """
    n, k = num_nodes, num_neighbours
    corrupt = math.floor(corrupt_fraction * n)
    surviving = math.ceil((1 - dropout_fraction) * n)
    total = math.comb(n, k)
    lowest = (k + 1) // 2 + 1  # above half of the k + 1 holders
    weights = _hypergeometric_weights(n, corrupt, k)
    tail = 0  # Pr[corrupt neighbours >= t] * C(n, k), growing as t falls
    for t in range(k + 1, lowest - 1, -1):
        tail += weights[t] if t <= k else 0
        if (tail * n << (security_bits + 1)) > total:
            lowest = t + 1
            break
    weights = _hypergeometric_weights(n, surviving, k)
    below = 0  # Pr[surviving neighbours < t] * C(n, k), growing as t rises
    highest = 0
    for t in range(k + 2):
        if (below * n << correctness_bits) > total:
            break
        highest = t
        below += weights[t] if t <= k else 0
    return lowest, min(highest, k + 1)


def _disconnection_bound_met(
    num_nodes: int, num_neighbours: int, *, bad_nodes: int, security_bits: int
) -> bool:
    """Whether Pr[the honest survivors of the Harary graph are disconnected] < 2^-(σ+1).

    Removing nodes disconnects a Harary ring of even degree ``k`` only if the removed nodes
    include ``k / 2`` consecutive ones at two disjoint places: ``n (n - k - 1) / 2`` pairs of
    places, each all bad with probability ``bad! (n - k)! / ((bad - k)! n!)`` (union bound).
    """
    n, k = num_nodes, num_neighbours
    if k >= n - 1 or bad_nodes < k:
        return True  # the complete graph never splits; fewer than k bad nodes cannot split it
    pairs_twice = n * (n - k - 1)
    bad_pairs = pairs_twice * math.perm(bad_nodes, k)  # 2 * Pr[split] * perm(n, k)
    return (bad_pairs << (security_bits + 1)) < 2 * math.perm(n, k)


@lru_cache(maxsize=1024)
def graph_parameters(
    num_nodes: int,
    *,
    corrupt_fraction: Fraction = CORRUPT_FRACTION,
    dropout_fraction: Fraction = DROPOUT_FRACTION,
    security_bits: int = SECURITY_BITS,
    correctness_bits: int = CORRECTNESS_BITS,
) -> GraphParameters:
    """The smallest degree ``k`` (and its threshold ``t``) that meets the Bell et al. bound.

    Candidates are the even ``k < n - 1`` (a Harary ring) and then ``k = n - 1`` (the complete
    graph). ``k`` is accepted when, with ``floor(γ n)`` corrupt and ``floor(δ n)`` dropped
    nodes placed uniformly: (1) the honest survivors stay connected except with probability
    2^-(σ+1) (:func:`_disconnection_bound_met`); (2) some ``t`` above half of the ``k + 1``
    holders is both above the corrupt-neighbour tail and below the surviving-neighbour tail
    (:func:`_threshold_bounds`); the smallest such ``t`` is returned (most dropout-tolerant).

    Parameters
    ----------
    num_nodes : int
        ``n >= 2``.
    corrupt_fraction, dropout_fraction : Fraction, optional
        ``γ`` and ``δ``; default :data:`CORRUPT_FRACTION` and :data:`DROPOUT_FRACTION` (1/3).
    security_bits, correctness_bits : int, optional
        ``σ`` and ``η``; default 40 and 20, as in the reference implementation.

    Returns
    -------
    GraphParameters
        ``meets_bound`` is False where no ``k`` does (then ``k = n - 1``).
    """
    n = num_nodes
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise SecAggConfigError(f"num_nodes={n!r} is not allowed; it must be an int >= 2")
    bad = math.floor(corrupt_fraction * n) + math.floor(dropout_fraction * n)
    settings = (corrupt_fraction, dropout_fraction, security_bits, correctness_bits)
    for k in [*range(2, n - 1, 2), n - 1]:
        if not _disconnection_bound_met(n, k, bad_nodes=bad, security_bits=security_bits):
            continue
        lowest, highest = _threshold_bounds(n, k, *settings)
        if lowest <= highest:
            return GraphParameters(n, k, lowest, meets_bound=True)
    k = n - 1
    lowest, _ = _threshold_bounds(n, k, *settings)
    return GraphParameters(n, k, lowest, meets_bound=False)


def default_num_neighbours(num_nodes: int) -> int:
    """Neighbours per node ``k``: the smallest that meets the Bell et al. (CCS 2020) bound.

    The bound (:func:`graph_parameters`) is for γ = 1/3 of the sites colluding with the
    coordinator and δ = 1/3 dropping out of a round, placed independently of the graph, with
    σ = 40 (a graph that could expose a site: probability < 2^-40) and η = 20 (a round that
    aborts for lack of shares: probability < 2^-20). It is the Harary-graph analysis of Bell
    et al. as Google's reference implementation computes it (google-parfait/federated-compute,
    ``fcp/secagg/server/graph_parameter_finder.cc``; it reproduces that file's test values
    for γ = δ = 0.33 and γ = δ = 0.45), with the threshold also kept above half of the
    ``k + 1`` share holders. Resulting ``k`` (and ``t``, :func:`default_threshold`):

    =====  ====  ====    =====  ====  ====    =====  ====  ====
      n      k     t       n      k     t       n      k     t
    =====  ====  ====    =====  ====  ====    =====  ====  ====
        3     2     2       16    12     7      100    68    35
        4     3     3       20    14     8      128    84    43
        5     4     3       26    18    10      200   122    64
        6     5     4       32    22    12      256   146    77
        7     6     4       40    28    15      300   164    86
        8     6     4       50    34    18      500   216   114
       10     8     5       64    44    23      700   254   134
       12    10     6       80    54    28     1000   292   154
    =====  ====  ====    =====  ====  ====    =====  ====  ====

    ``k = n - 1`` (the complete graph) for ``n <= 7`` and ``n = 9``; for ``n`` = 2, 3, 4 and
    6 no graph meets the bound (a third of them dropped leaves too few share holders) and the
    complete graph is used anyway, the most tolerant choice.
    Against a coordinator that *chooses* whom to drop the bound says nothing; there the hard
    guarantee is :meth:`SecAggServer.unmask`'s check that the survivors are connected and at
    least ``max(t, min_sum)``. Cost grows with ``k``: each node derives ``k`` masks, and the
    server one per (dropped node, surviving neighbour) pair; set ``num_neighbours`` (and
    ``threshold``) explicitly for another threat model.
    """
    return graph_parameters(max(num_nodes, 2)).num_neighbours


def default_threshold(num_neighbours: int, *, num_nodes: int | None = None) -> int:
    """Shares needed to reconstruct a secret, for degree ``k`` (and ``n`` nodes if given).

    Without ``num_nodes``: the smallest threshold above half of the ``k + 1`` share holders
    (the node and its neighbours), ``floor((k + 1) / 2) + 1``: the most dropout-tolerant
    threshold that still keeps the server from gathering both kinds of shares of one node.
    With ``num_nodes``: also above the corrupt-neighbour tail of the bound of
    :func:`default_num_neighbours` (γ = 1/3, σ = 40), at most ``k + 1``; for the default ``k``
    this is the table's ``t`` (above the majority only from a few hundred nodes on). For a
    ``k`` far below the default it reaches ``k + 1``, where no holder may drop, which is why
    :class:`SecAggServer` uses it only with the default ``k``.
    """
    majority = (num_neighbours + 1) // 2 + 1
    valid = (
        isinstance(num_nodes, int)
        and isinstance(num_neighbours, int)
        and 1 <= num_neighbours <= num_nodes - 1
    )
    if num_nodes is None or not valid:
        return majority  # invalid combinations are reported by graph_problems
    settings = (CORRUPT_FRACTION, DROPOUT_FRACTION, SECURITY_BITS, CORRECTNESS_BITS)
    lowest, _ = _threshold_bounds(num_nodes, num_neighbours, *settings)
    return lowest


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
    elif num_neighbours == 1 and num_nodes > 2:
        problems.append(
            f"num_neighbours=1 with {num_nodes} nodes pairs them off into separate pairs, so "
            "the masks would cancel within each pair and every pair's own sum could be "
            "unmasked; use num_neighbours >= 2 (a connected ring)"
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
