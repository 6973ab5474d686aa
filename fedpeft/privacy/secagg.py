"""SecAgg+ secure aggregation as two transport-free state machines (semi-honest server).

This module owns the protocol of Bonawitz et al. (CCS 2017) with the sparse neighbour graph of
Bell et al. (CCS 2020), "SecAgg+": :class:`SecAggServer` and :class:`SecAggClient` consume and
produce the frozen message dataclasses below (ints, bytes, ``Mapping[int, bytes]`` and uint32
arrays), so glue code can carry them over any transport. Quantisation, Shamir sharing and the
cryptographic primitives are in :mod:`~fedpeft.privacy.quantize`,
:mod:`~fedpeft.privacy.shamir` and :mod:`~fedpeft.privacy.masking`.

Written by hand because ``cryptography`` provides primitives, not a secure aggregation
protocol, and Flower's own SecAgg+ draws masks from ``numpy.random.RandomState`` seeded with 32
bits and uses int64 vectors; here masks come from ChaCha20 keyed by 256-bit secrets and the
upload is exactly 4 bytes (uint32) per parameter.

One round, stages named as in Flower's ``secaggplus`` workflow (``U1 ⊇ U2 ⊇ U3``):

1. setup: the server builds a random ``k``-regular neighbour graph and sends each node a
   :class:`SetupRequest`; each node answers :class:`PublicKeys` (two X25519 keys).
2. share_keys: each node in ``U1`` (keys received) gets its neighbours' keys
   (:class:`ShareKeysRequest`), Shamir-shares its self-mask seed ``b_i`` and mask private key
   ``s_i`` among itself and its ``k`` neighbours (threshold ``t`` of ``k + 1``) and answers
   :class:`EncryptedShares` (AES-GCM, one ciphertext per neighbour).
3. collect_masked_vectors: each node in ``U2`` (shares received) gets the ciphertexts addressed
   to it (:class:`MaskedVectorRequest`) and answers :class:`MaskedVector`:
   ``q_i + PRG(b_i) + sum_{j in N(i) ∩ U2} ±PRG(KDF(ECDH(s_i, s_j)))`` mod 2^32 (``+`` if
   ``i < j``).
4. unmask: each node in ``U3`` (vector received) is asked (:class:`UnmaskRequest`) for its shares
   of ``b_j`` for surviving neighbours and of ``s_j`` for dropped neighbours, never both for one
   node, and answers :class:`UnmaskShares`; :meth:`SecAggServer.result` removes the masks.

The server learns only the sum over ``U3``. A malformed or out-of-protocol message raises a
:class:`SecAggProtocolError` (the glue logs it and treats the sender as dropped); a round that
can no longer finish raises :class:`SecAggAbort`. The update may carry extra elements (e.g. an
aggregation weight); they are summed like the rest and must lie within ``[-clip, clip]``.

Before any node masks, the server drops nodes left with fewer than ``t`` live share holders
(they could not be unmasked). Not covered: an actively malicious server (public keys are not
signed, so a server that substitutes keys could read shares; there is no consistency-check
round), and protection of the sum itself, which is the job of differential privacy.

Layout: :mod:`~fedpeft.privacy.secagg_messages` (errors, stages, messages, neighbour graph),
:mod:`~fedpeft.privacy.secagg_client` (:class:`SecAggClient`),
:mod:`~fedpeft.privacy.secagg_server` (:class:`SecAggServer`) and
:mod:`~fedpeft.privacy.secagg_wire` (messages as flat dicts of scalars, for a transport). This
module re-exports their public names, so ``from fedpeft.privacy.secagg import ...`` is the one
import callers need.
"""

from __future__ import annotations

from fedpeft.privacy.secagg_client import SecAggClient
from fedpeft.privacy.secagg_messages import (
    EncryptedShares,
    MaskedVector,
    MaskedVectorRequest,
    PublicKeys,
    SecAggAbort,
    SecAggConfigError,
    SecAggError,
    SecAggProtocolError,
    SecAggResult,
    SetupRequest,
    ShareKeysRequest,
    Stage,
    UnmaskRequest,
    UnmaskShares,
    build_neighbour_graph,
    default_num_neighbours,
    default_threshold,
)
from fedpeft.privacy.secagg_server import SecAggServer

__all__ = [
    "EncryptedShares",
    "MaskedVector",
    "MaskedVectorRequest",
    "PublicKeys",
    "SecAggAbort",
    "SecAggClient",
    "SecAggConfigError",
    "SecAggError",
    "SecAggProtocolError",
    "SecAggResult",
    "SecAggServer",
    "SetupRequest",
    "ShareKeysRequest",
    "Stage",
    "UnmaskRequest",
    "UnmaskShares",
    "build_neighbour_graph",
    "default_num_neighbours",
    "default_threshold",
]
