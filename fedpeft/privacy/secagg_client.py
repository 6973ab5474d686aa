"""The node's side of a SecAgg+ round: :class:`SecAggClient`.

This module owns one node's state machine (fresh keys, Shamir sharing of its secrets,
masking its quantised update, revealing shares on request) and the serialisation of that
state between stages (:meth:`SecAggClient.to_state`). Messages, errors and shared helpers are
in :mod:`fedpeft.privacy.secagg_messages`; the protocol is described in
:mod:`fedpeft.privacy.secagg`; carrying messages over a transport is the caller's job.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedpeft.privacy import masking, shamir
from fedpeft.privacy.quantize import QuantizationParams, quantize
from fedpeft.privacy.secagg_messages import (
    PAYLOAD_BYTES,
    SHARES_AD_PURPOSE,
    EncryptedShares,
    MaskedVector,
    MaskedVectorRequest,
    PublicKeys,
    SecAggConfigError,
    SecAggProtocolError,
    SetupRequest,
    ShareKeysRequest,
    Stage,
    UnmaskRequest,
    UnmaskShares,
    check_id,
    check_keys,
    check_message,
    share_holders,
)

__all__ = ["SecAggClient"]

RequestMessage = SetupRequest | ShareKeysRequest | MaskedVectorRequest | UnmaskRequest


def _hex_map(values: Mapping[int, bytes]) -> dict[str, str]:
    return {str(node): value.hex() for node, value in values.items()}


def _unhex_map(values: Mapping[str, str]) -> dict[int, bytes]:
    return {int(node): bytes.fromhex(value) for node, value in values.items()}


class SecAggClient:
    """A node's side of one SecAgg+ round.

    Call :meth:`setup`, :meth:`share_keys`, :meth:`collect_masked_vectors` and :meth:`unmask`
    in order, each with the server's request; each returns the reply to send. A request that
    breaks the protocol raises :class:`SecAggProtocolError` and leaves the state unchanged.
    Between calls the state can be kept outside the process with :meth:`to_state` and
    :meth:`from_state` (it holds private keys: keep it on the site, e.g. in Flower's
    ``context.state``, never send it).

    Parameters
    ----------
    node_id : int
        This node's id (unsigned 64-bit, e.g. Flower's node id).

    Attributes
    ----------
    stage : Stage
        The request it expects next (``SETUP`` ... ``UNMASK``, then ``DONE``).
    num_clipped : int or None
        How many update values were clipped, once masked; for local logs only, never sent.
    """

    def __init__(self, *, node_id: int) -> None:
        self.node_id = check_id("node_id", node_id)
        self.stage = Stage.SETUP
        self._round_id = 0
        self._neighbours: tuple[int, ...] = ()
        self._threshold = 0
        self._length = 0
        self._quantization: QuantizationParams | None = None
        self._encryption_sk = b""
        self._mask_sk = b""
        self._seed = b""
        self._peer_encryption_keys: dict[int, bytes] = {}
        self._peer_mask_keys: dict[int, bytes] = {}
        self._held: dict[int, tuple[bytes, bytes]] = {}  # owner -> (share of b, share of s)
        self.num_clipped: int | None = None  # local diagnostics only: never send it

    def _expect(self, stage: Stage, request: Any) -> None:
        if self.stage is not stage:
            raise SecAggProtocolError(
                f"node {self.node_id} received {type(request).__name__} (stage {stage.value}) "
                f"while in stage {self.stage.value}; each stage runs once, in order"
            )
        check_message(
            request,
            round_id=request.round_id if stage is Stage.SETUP else self._round_id,
            node_id=self.node_id,
        )

    @property
    def session_id(self) -> str:
        """This node's identity of the round in progress: SHA-256 of the round id and its own
        mask public key, fresh at every setup (hex). Empty before setup and after the end."""
        if not self._mask_sk:
            return ""
        public = masking.public_key_bytes(masking.load_private_key(self._mask_sk))
        return hashlib.sha256(self._round_id.to_bytes(8, "big") + public).hexdigest()

    def check_request(self, request: RequestMessage) -> None:
        """Raise :class:`SecAggProtocolError` unless ``request`` is the one expected next.

        The same check every stage method makes first (stage, round, addressee); call it before
        expensive work that a stale or misrouted request should not trigger (local training).
        """
        stages: dict[type, Stage] = {
            SetupRequest: Stage.SETUP,
            ShareKeysRequest: Stage.SHARE_KEYS,
            MaskedVectorRequest: Stage.COLLECT_MASKED_VECTORS,
            UnmaskRequest: Stage.UNMASK,
        }
        self._expect(stages[type(request)], request)

    def setup(self, request: SetupRequest) -> PublicKeys:
        """Stage setup: check the round's parameters and answer two fresh public keys."""
        self._expect(Stage.SETUP, request)
        check_id("round_id", request.round_id, error=SecAggProtocolError)
        neighbours = tuple(
            check_id("neighbour id", n, error=SecAggProtocolError) for n in request.neighbours
        )
        problems = []
        if not isinstance(request.quantization, QuantizationParams):
            raise SecAggProtocolError(
                f"SetupRequest.quantization is a {type(request.quantization).__name__}; it must "
                "be a QuantizationParams (rebuild it from clip, num_summands and bits)"
            )
        if len(set(neighbours)) != len(neighbours) or self.node_id in neighbours:
            problems.append(f"neighbours={neighbours} must be distinct and exclude node itself")
        if (
            not neighbours
            or not (len(neighbours) + 1) / 2 < request.threshold <= len(neighbours) + 1
        ):
            problems.append(
                f"threshold={request.threshold!r} with {len(neighbours)} neighbours is not "
                "allowed; it must satisfy (k + 1)/2 < threshold <= k + 1"
            )
        if not isinstance(request.vector_length, int) or request.vector_length < 1:
            problems.append(f"vector_length={request.vector_length!r} must be an int >= 1")
        if request.quantization.num_summands < len(neighbours) + 1:
            problems.append(
                f"quantization.num_summands={request.quantization.num_summands} is below the "
                f"{len(neighbours) + 1} nodes this node knows of; the sum could overflow"
            )
        if problems:
            raise SecAggProtocolError("rejected SetupRequest: " + "; ".join(problems))
        encryption_sk, mask_sk = masking.generate_private_key(), masking.generate_private_key()
        self._round_id, self._neighbours = request.round_id, tuple(sorted(neighbours))
        self._threshold, self._length = request.threshold, request.vector_length
        self._quantization = request.quantization
        self._encryption_sk = masking.private_key_bytes(encryption_sk)
        self._mask_sk = masking.private_key_bytes(mask_sk)
        self.stage = Stage.SHARE_KEYS
        return PublicKeys(
            round_id=self._round_id,
            node_id=self.node_id,
            encryption_key=masking.public_key_bytes(encryption_sk),
            mask_key=masking.public_key_bytes(mask_sk),
        )

    def share_keys(self, request: ShareKeysRequest) -> EncryptedShares:
        """Stage share_keys: secret-share ``b_i`` and ``s_i`` and encrypt one share pair per
        neighbour that advertised keys."""
        self._expect(Stage.SHARE_KEYS, request)
        peers = set(request.encryption_keys)
        if peers != set(request.mask_keys) or not peers <= set(self._neighbours):
            raise SecAggProtocolError(
                f"ShareKeysRequest for node {self.node_id} lists keys of nodes "
                f"{sorted(peers | set(request.mask_keys))}; both key maps must name the same "
                f"nodes, all among its neighbours {self._neighbours}"
            )
        if len(peers) + 1 < self._threshold:
            raise SecAggProtocolError(
                f"only {len(peers)} neighbour(s) of node {self.node_id} are left; at least "
                f"{self._threshold - 1} are needed for threshold {self._threshold}"
            )
        check_keys("encryption key", request.encryption_keys)
        check_keys("mask key", request.mask_keys)
        seed = secrets.token_bytes(masking.KEY_BYTES)
        holders = share_holders(self.node_id, self._neighbours)
        seed_shares = shamir.share(seed, threshold=self._threshold, num_shares=len(holders))
        key_shares = shamir.share(self._mask_sk, threshold=self._threshold, num_shares=len(holders))
        pairs = {
            holder: (seed_share.to_bytes(), key_share.to_bytes())
            for holder, seed_share, key_share in zip(holders, seed_shares, key_shares, strict=True)
        }
        ciphertexts = {
            peer: masking.encrypt(
                self._share_key(peer, request.encryption_keys[peer]),
                pairs[peer][0] + pairs[peer][1],
                associated_data=self._shares_ad(self.node_id, peer),
            )
            for peer in sorted(peers)
        }
        self._peer_encryption_keys = dict(request.encryption_keys)
        self._peer_mask_keys = dict(request.mask_keys)
        self._seed, self._held = seed, {self.node_id: pairs[self.node_id]}
        self.stage = Stage.COLLECT_MASKED_VECTORS
        return EncryptedShares(
            round_id=self._round_id, node_id=self.node_id, ciphertexts=ciphertexts
        )

    def collect_masked_vectors(
        self,
        request: MaskedVectorRequest,
        *,
        update: NDArray[np.floating],
        rng: np.random.Generator | None = None,
    ) -> MaskedVector:
        """Stage collect_masked_vectors: keep the neighbours' shares, answer the masked update.

        Parameters
        ----------
        request : MaskedVectorRequest
            Ciphertexts from the neighbours still in the round; they are the nodes this node
            exchanges pairwise masks with.
        update : NDArray[np.floating]
            The flat update, shape ``(vector_length,)``; clipped to ``[-clip, clip]``
            (:attr:`num_clipped` counts how many values were).
        rng : numpy.random.Generator, optional
            For stochastic rounding only (not secret); default: a fresh OS-seeded generator.
        """
        self._expect(Stage.COLLECT_MASKED_VECTORS, request)
        values = np.asarray(update)
        if values.shape != (self._length,) or not np.issubdtype(values.dtype, np.floating):
            raise SecAggConfigError(
                f"update has shape {values.shape} and dtype {values.dtype}; the round expects a "
                f"float vector of shape ({self._length},) (flatten the adapter delta)"
            )
        senders = set(request.ciphertexts)
        if not senders <= set(self._peer_encryption_keys) or len(senders) + 1 < self._threshold:
            raise SecAggProtocolError(
                f"MaskedVectorRequest for node {self.node_id} has shares from {sorted(senders)}; "
                f"they must be among {sorted(self._peer_encryption_keys)} and number at least "
                f"{self._threshold - 1}"
            )
        held = {self.node_id: self._held[self.node_id]}
        for sender, ciphertext in request.ciphertexts.items():
            key = self._share_key(sender, self._peer_encryption_keys[sender])
            try:
                payload = masking.decrypt(
                    key, ciphertext, associated_data=self._shares_ad(sender, self.node_id)
                )
            except masking.CryptoError as error:
                raise SecAggProtocolError(f"shares from node {sender}: {error}") from error
            if len(payload) != PAYLOAD_BYTES:
                raise SecAggProtocolError(f"shares from node {sender} have a malformed payload")
            held[sender] = (payload[: shamir.SHARE_BYTES], payload[shamir.SHARE_BYTES :])
        if self._quantization is None:  # unreachable after setup(); kept for the type checker
            raise SecAggProtocolError(f"node {self.node_id} has no quantisation parameters")
        quantized = quantize(
            values, self._quantization, rng=rng if rng is not None else np.random.default_rng()
        )
        masked = quantized.values  # uint32 arithmetic wraps: every operation is mod 2^32
        masked += masking.prg_uint32(self._seed, self._length)
        for peer in sorted(senders):
            mask = masking.pair_mask(
                self._mask_sk,
                self._peer_mask_keys[peer],
                round_id=self._round_id,
                a=self.node_id,
                b=peer,
                length=self._length,
            )
            if self.node_id < peer:
                masked += mask
            else:
                masked -= mask
        self._held, self.num_clipped = held, quantized.num_clipped
        # Secrets no longer needed: only the held shares are used from here on.
        self._seed = self._encryption_sk = self._mask_sk = b""
        self.stage = Stage.UNMASK
        return MaskedVector(round_id=self._round_id, node_id=self.node_id, vector=masked)

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Stage unmask: reveal ``b`` shares of survivors and ``s`` shares of dropped nodes.

        Refuses (``SecAggProtocolError``) a node listed as both survived and dropped, this node
        listed as dropped, a node whose shares it does not hold, or fewer than ``threshold``
        survivors, since any of these could let the server unmask a single update.
        """
        self._expect(Stage.UNMASK, request)
        survived, dropped = set(request.survived), set(request.dropped)
        problems = []
        if survived & dropped:
            problems.append(
                f"nodes {sorted(survived & dropped)} are listed as both survived and dropped; "
                "revealing both kinds of shares of one node would unmask its update"
            )
        if self.node_id in dropped:
            problems.append(f"node {self.node_id} itself is listed as dropped, but it is alive")
        unknown = (survived | dropped) - set(self._held)
        if unknown:
            problems.append(f"node {self.node_id} holds no shares of nodes {sorted(unknown)}")
        if len(survived) < self._threshold:
            problems.append(
                f"only {len(survived)} survivor(s) listed, fewer than threshold "
                f"{self._threshold}; the server must abort the round instead"
            )
        if len(request.survived) != len(survived) or len(request.dropped) != len(dropped):
            problems.append("survived and dropped must not repeat node ids")
        if problems:
            raise SecAggProtocolError(
                f"node {self.node_id} refuses the UnmaskRequest: " + "; ".join(problems)
            )
        reply = UnmaskShares(
            round_id=self._round_id,
            node_id=self.node_id,
            self_mask_shares={node: self._held[node][0] for node in sorted(survived)},
            mask_key_shares={node: self._held[node][1] for node in sorted(dropped)},
        )
        self._held = {}
        self.stage = Stage.DONE
        return reply

    def _share_key(self, peer: int, peer_key: bytes) -> bytes:
        try:
            return masking.share_key(
                self._encryption_sk, peer_key, round_id=self._round_id, a=self.node_id, b=peer
            )
        except masking.CryptoError as error:
            raise SecAggProtocolError(f"encryption key of node {peer}: {error}") from error

    def _shares_ad(self, sender: int, recipient: int) -> bytes:
        return masking.associated_data(
            SHARES_AD_PURPOSE, round_id=self._round_id, sender=sender, recipient=recipient
        )

    def to_state(self) -> bytes:
        """Serialise the state (including private keys) to keep it between stages on the site."""
        q = self._quantization
        state = {
            "node_id": self.node_id,
            "stage": self.stage.value,
            "round_id": self._round_id,
            "neighbours": list(self._neighbours),
            "threshold": self._threshold,
            "length": self._length,
            "quantization": None if q is None else [q.clip, q.num_summands, q.bits],
            "encryption_sk": self._encryption_sk.hex(),
            "mask_sk": self._mask_sk.hex(),
            "seed": self._seed.hex(),
            "peer_encryption_keys": _hex_map(self._peer_encryption_keys),
            "peer_mask_keys": _hex_map(self._peer_mask_keys),
            "held": {str(k): [a.hex(), b.hex()] for k, (a, b) in self._held.items()},
            "num_clipped": self.num_clipped,
        }
        return json.dumps(state).encode()

    @classmethod
    def from_state(cls, data: bytes) -> SecAggClient:
        """Restore a client from :meth:`to_state` output."""
        try:
            state = json.loads(data)
            client = cls(node_id=state["node_id"])
            client.stage = Stage(state["stage"])
            client._round_id, client._threshold = state["round_id"], state["threshold"]
            client._neighbours, client._length = tuple(state["neighbours"]), state["length"]
            q = state["quantization"]
            client._quantization = None if q is None else QuantizationParams(*q)
            client._encryption_sk = bytes.fromhex(state["encryption_sk"])
            client._mask_sk = bytes.fromhex(state["mask_sk"])
            client._seed = bytes.fromhex(state["seed"])
            client._peer_encryption_keys = _unhex_map(state["peer_encryption_keys"])
            client._peer_mask_keys = _unhex_map(state["peer_mask_keys"])
            client._held = {
                int(k): (bytes.fromhex(a), bytes.fromhex(b)) for k, (a, b) in state["held"].items()
            }
            client.num_clipped = state["num_clipped"]
        except (ValueError, KeyError, TypeError) as error:
            raise SecAggConfigError(
                f"the saved SecAggClient state is unreadable ({error}); start a new round"
            ) from error
        return client
