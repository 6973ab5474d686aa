"""The server's side of a SecAgg+ round: :class:`SecAggServer`.

This module owns the coordinator's state machine: the neighbour graph of a round, routing
public keys and encrypted shares, summing masked vectors in Z_{2^32}, tracking which nodes
dropped at which stage, reconstructing the secrets it is entitled to and removing the masks.
Messages, errors and shared helpers are in :mod:`fedpeft.privacy.secagg_messages`; the protocol
is described in :mod:`fedpeft.privacy.secagg`; carrying messages is the caller's job.

**What may be released.** Pairwise masks cancel only between nodes that both sent a masked
vector. If the survivors ``U3`` split into groups with no neighbour-graph edge between them,
then, once the self masks and the dropped nodes' masks are removed, each group's masked
vectors add up to that group's own sum: the server would learn sums of subgroups. So the
server refuses to unmask (:meth:`SecAggServer.unmask` raises :class:`SecAggAbort` before it
asks for any share) unless ``U3`` is connected in the graph induced on it and holds at least
``max(threshold, min_sum)`` nodes. Before anyone masks it also narrows the live nodes to the
largest connected group whose members all keep ``threshold`` live share holders, so nodes
that could never be in a releasable sum are not asked to train and mask. These checks hold
against a coordinator that chooses who drops; they do not cover sites that collude with it
(the graph defaults of :func:`~fedpeft.privacy.secagg_messages.default_num_neighbours`
bound that risk for randomly placed colluders).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, NoReturn

import numpy as np

from fedpeft.privacy import masking, shamir
from fedpeft.privacy.quantize import QuantizationParams, dequantize_sum
from fedpeft.privacy.secagg_messages import (
    CIPHERTEXT_BYTES,
    EncryptedShares,
    MaskedVector,
    MaskedVectorRequest,
    PublicKeys,
    SecAggAbort,
    SecAggConfigError,
    SecAggProtocolError,
    SecAggResult,
    SetupRequest,
    ShareKeysRequest,
    Stage,
    UnmaskRequest,
    UnmaskShares,
    build_neighbour_graph,
    check_id,
    check_keys,
    check_message,
    default_num_neighbours,
    default_threshold,
    graph_problems,
    share_holders,
)

__all__ = ["SecAggServer"]


class SecAggServer:
    """The server's side of one SecAgg+ round (semi-honest: it follows the protocol).

    For each stage call the request method (:meth:`setup`, :meth:`share_keys`,
    :meth:`collect_masked_vectors`, :meth:`unmask`), send each request to its node, pass every
    reply that arrives to the matching ``receive_*`` method, then call the next request method;
    a node that has not replied by then is treated as dropped. Finish with :meth:`result`.
    ``receive_*`` raises :class:`SecAggProtocolError` for a bad message (log it and go on: the
    sender counts as dropped); any method may raise :class:`SecAggAbort`.

    Parameters
    ----------
    round_id : int
        Unsigned 64-bit id, unique per round (it is bound into every key and ciphertext).
    node_ids : Sequence[int]
        The sampled participants (distinct unsigned 64-bit ids, at least 2).
    vector_length : int
        Length ``L`` of every update, weight elements included.
    clip : float
        Updates are clipped to ``[-clip, clip]`` and quantised for ``len(node_ids)`` summands.
    num_neighbours : int, optional
        Graph degree ``k``, ``1 <= k <= n - 1``; default :func:`default_num_neighbours`.
    threshold : int, optional
        Shares needed to reconstruct a secret, ``(k + 1) / 2 < t <= k + 1``; default
        :func:`default_threshold`: with the default ``k`` the bound's ``t`` for ``n`` nodes,
        with an explicit ``k`` the smallest majority of the ``k + 1`` holders. Larger
        tolerates more colluding nodes, smaller more dropouts.
    min_sum : int, optional
        The fewest nodes a released sum may cover (e.g. ``federation.min_sites``); default 0,
        which leaves the floor at the threshold. The round releases a sum only over at least
        ``max(threshold, min_sum)`` connected nodes and is abandoned (:class:`SecAggAbort`)
        as soon as fewer remain, before any share is requested.

    Attributes
    ----------
    stage : Stage
        The stage whose replies it accepts (``INIT`` before :meth:`setup`; ``DONE`` or
        ``ABORTED`` at the end).
    graph : dict[int, tuple[int, ...]]
        Each participant's neighbours.
    num_neighbours, threshold : int
        The resolved ``k`` and ``t``.
    min_sum : int
        As given.
    min_included : int
        ``max(threshold, min_sum)``: the fewest nodes any released sum covers.
    quantization : QuantizationParams
        Sent to every node in its :class:`SetupRequest`.
    """

    def __init__(
        self,
        *,
        round_id: int,
        node_ids: Sequence[int],
        vector_length: int,
        clip: float,
        num_neighbours: int | None = None,
        threshold: int | None = None,
        min_sum: int = 0,
    ) -> None:
        ids = [check_id("node id", node) for node in node_ids]
        self.round_id = check_id("round_id", round_id)
        n = len(ids)
        k = default_num_neighbours(n) if num_neighbours is None else num_neighbours
        self.num_neighbours = k
        if threshold is None:  # the bound's t for the default k; else half the holders + 1
            threshold = default_threshold(k, num_nodes=n if num_neighbours is None else None)
        self.threshold = threshold
        problems = graph_problems(n, self.num_neighbours, self.threshold)
        if not isinstance(min_sum, int) or isinstance(min_sum, bool) or min_sum < 0:
            problems.append(
                f"min_sum={min_sum!r} is not allowed; it must be an int >= 0 (the fewest "
                "sites a released sum may cover, e.g. federation.min_sites)"
            )
        if len(set(ids)) != n:
            repeated = sorted({node for node in ids if ids.count(node) > 1})
            problems.append(f"node_ids repeats {repeated}; each participant must appear once")
        if not isinstance(vector_length, int) or vector_length < 1:
            problems.append(f"vector_length={vector_length!r} is not allowed; it must be >= 1")
        try:
            self.quantization = QuantizationParams(clip=clip, num_summands=max(n, 1))
        except ValueError as error:
            problems.append(str(error))
        if problems:
            raise SecAggConfigError("invalid SecAgg+ parameters: " + "; ".join(problems))
        self.vector_length = vector_length
        self.min_sum = min_sum
        self.min_included = max(self.threshold, min_sum)
        self.graph = build_neighbour_graph(ids, num_neighbours=self.num_neighbours)
        self.stage = Stage.INIT
        self._live: set[int] = set(ids)  # nodes still in the round at the current stage
        self._replied: set[int] = set()
        self._encryption_keys: dict[int, bytes] = {}
        self._mask_keys: dict[int, bytes] = {}
        self._ciphertexts: dict[int, Mapping[int, bytes]] = {}  # sender -> recipient -> bytes
        self._total = np.zeros(vector_length, dtype=np.uint32)
        self._requests: dict[int, UnmaskRequest] = {}
        self._seed_shares: dict[int, list[shamir.Share]] = {}  # owner -> shares of b
        self._key_shares: dict[int, list[shamir.Share]] = {}  # owner -> shares of s
        self._dropped_after_sharing: set[int] = set()  # U2 minus U3
        self._result: SecAggResult | None = None

    # -- stage transitions -------------------------------------------------------------------

    def setup(self) -> dict[int, SetupRequest]:
        """Start stage setup: one :class:`SetupRequest` per participant."""
        self._advance(Stage.INIT, Stage.SETUP)
        return {
            node: SetupRequest(
                round_id=self.round_id,
                node_id=node,
                neighbours=self.graph[node],
                threshold=self.threshold,
                vector_length=self.vector_length,
                quantization=self.quantization,
            )
            for node in sorted(self._live)
        }

    def share_keys(self) -> dict[int, ShareKeysRequest]:
        """Close setup, start share_keys: each node gets its live neighbours' public keys."""
        self._advance(Stage.SETUP, Stage.SHARE_KEYS)
        return {
            node: ShareKeysRequest(
                round_id=self.round_id,
                node_id=node,
                encryption_keys={j: self._encryption_keys[j] for j in self._live_neighbours(node)},
                mask_keys={j: self._mask_keys[j] for j in self._live_neighbours(node)},
            )
            for node in sorted(self._live)
        }

    def collect_masked_vectors(self) -> dict[int, MaskedVectorRequest]:
        """Close share_keys, start collect_masked_vectors: route the ciphertexts."""
        self._advance(Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS)
        return {
            node: MaskedVectorRequest(
                round_id=self.round_id,
                node_id=node,
                ciphertexts={j: self._ciphertexts[j][node] for j in self._live_neighbours(node)},
            )
            for node in sorted(self._live)
        }

    def unmask(self) -> dict[int, UnmaskRequest]:
        """Close collect_masked_vectors, start unmask: ask survivors for shares.

        Every check comes before any request, so an aborted round has asked for no share:
        the survivors ``U3`` must number at least :attr:`min_included`, be connected in the
        graph induced on them (otherwise each group's own sum could be unmasked), and every
        secret to reconstruct must keep ``threshold`` live holders.

        Raises
        ------
        SecAggAbort
            If any check fails; no :class:`UnmaskRequest` exists then.
        """
        masked = set(self._live)  # U2, the nodes that every survivor masked with
        self._advance(Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK, prune=False)
        dropped = masked - self._live
        groups = self._components(self._live)
        if len(groups) > 1:
            sizes = sorted((len(group) for group in groups), reverse=True)
            self._abort(
                f"the {len(self._live)} nodes that sent masked vectors form {len(groups)} "
                f"separate groups (sizes {sizes}) in the neighbour graph; unmasking would "
                "reveal each group's own sum"
            )
        for owner in sorted(self._live | {d for d in dropped if self._live_neighbours(d)}):
            holders = len(self._live_neighbours(owner)) + (owner in self._live)
            if holders < self.threshold:
                self._abort(
                    f"only {holders} live holder(s) of node {owner}'s shares remain, fewer than "
                    f"threshold {self.threshold}"
                )
        self._requests = {
            node: UnmaskRequest(
                round_id=self.round_id,
                node_id=node,
                survived=share_holders(node, self._live_neighbours(node)),
                dropped=tuple(j for j in self.graph[node] if j in dropped),
            )
            for node in sorted(self._live)
        }
        self._dropped_after_sharing = dropped
        return dict(self._requests)

    def result(self) -> SecAggResult:
        """Close unmask: reconstruct the secrets, remove all masks, return the sum."""
        if self._result is not None:
            return self._result
        if self.stage is not Stage.UNMASK:
            raise SecAggProtocolError(
                f"result() called in stage {self.stage.value}; call it after unmask() and the "
                "replies to it"
            )
        total = self._total.copy()
        for owner in sorted(self._live):
            seed = self._reconstruct(owner, self._seed_shares.get(owner, []), "self-mask seed")
            total -= masking.prg_uint32(seed, self.vector_length)
        for owner in sorted(self._dropped_after_sharing):
            peers = self._live_neighbours(owner)
            if not peers:
                continue  # no survivor masked with it
            key = self._reconstruct(owner, self._key_shares.get(owner, []), "mask key")
            if masking.public_key_bytes(masking.load_private_key(key)) != self._mask_keys[owner]:
                self._abort(f"the reconstructed mask key of node {owner} does not match its key")
            for peer in peers:
                mask = masking.pair_mask(
                    key,
                    self._mask_keys[peer],
                    round_id=self.round_id,
                    a=owner,
                    b=peer,
                    length=self.vector_length,
                )
                if peer < owner:  # the survivor added the mask; remove it
                    total -= mask
                else:
                    total += mask
        included = tuple(sorted(self._live))
        self._result = SecAggResult(
            total=dequantize_sum(total, self.quantization, count=len(included)),
            quantized_total=total,
            included=included,
            dropped=tuple(sorted(set(self.graph) - self._live)),
        )
        self.stage = Stage.DONE
        return self._result

    # -- replies -----------------------------------------------------------------------------

    def receive_public_keys(self, reply: PublicKeys) -> None:
        """Accept a node's :class:`PublicKeys` (stage setup)."""
        self._check_reply(reply, Stage.SETUP)
        check_keys("public key", {reply.node_id: reply.encryption_key})
        check_keys("public key", {reply.node_id: reply.mask_key})
        self._encryption_keys[reply.node_id] = reply.encryption_key
        self._mask_keys[reply.node_id] = reply.mask_key
        self._replied.add(reply.node_id)

    def receive_encrypted_shares(self, reply: EncryptedShares) -> None:
        """Accept a node's :class:`EncryptedShares` (stage share_keys)."""
        self._check_reply(reply, Stage.SHARE_KEYS)
        expected = set(self._live_neighbours(reply.node_id))
        if set(reply.ciphertexts) != expected:
            raise SecAggProtocolError(
                f"EncryptedShares from node {reply.node_id} are addressed to "
                f"{sorted(reply.ciphertexts)}; expected exactly its live neighbours "
                f"{sorted(expected)}"
            )
        for recipient, ciphertext in reply.ciphertexts.items():
            if not isinstance(ciphertext, bytes) or len(ciphertext) != CIPHERTEXT_BYTES:
                raise SecAggProtocolError(
                    f"ciphertext from node {reply.node_id} to node {recipient} must be "
                    f"{CIPHERTEXT_BYTES} bytes"
                )
        self._ciphertexts[reply.node_id] = dict(reply.ciphertexts)
        self._replied.add(reply.node_id)

    def receive_masked_vector(self, reply: MaskedVector) -> None:
        """Accept a node's :class:`MaskedVector` (stage collect_masked_vectors) into the sum."""
        self._check_reply(reply, Stage.COLLECT_MASKED_VECTORS)
        vector = reply.vector
        if (
            not isinstance(vector, np.ndarray)
            or vector.dtype != np.uint32
            or vector.shape != (self.vector_length,)
        ):
            shape = getattr(vector, "shape", None)
            raise SecAggProtocolError(
                f"masked vector from node {reply.node_id} has shape {shape} and dtype "
                f"{getattr(vector, 'dtype', type(vector).__name__)}; expected uint32 of shape "
                f"({self.vector_length},) (decode with np.frombuffer(data, dtype='<u4'))"
            )
        self._total += vector  # uint32 wraps: the sum is mod 2^32
        self._replied.add(reply.node_id)

    def receive_unmask_shares(self, reply: UnmaskShares) -> None:
        """Accept a node's :class:`UnmaskShares` (stage unmask)."""
        self._check_reply(reply, Stage.UNMASK)
        request = self._requests[reply.node_id]
        if set(reply.self_mask_shares) != set(request.survived) or set(
            reply.mask_key_shares
        ) != set(request.dropped):
            raise SecAggProtocolError(
                f"UnmaskShares from node {reply.node_id} do not answer its request: expected "
                f"seed shares of {request.survived} and key shares of {request.dropped}"
            )
        parsed = []
        for kind, shares in (("seed", reply.self_mask_shares), ("key", reply.mask_key_shares)):
            for owner, data in shares.items():
                try:
                    share = shamir.Share.from_bytes(data)
                except shamir.ShamirError as error:
                    message = f"share from node {reply.node_id}: {error}"
                    raise SecAggProtocolError(message) from error
                expected = share_holders(owner, self.graph[owner]).index(reply.node_id) + 1
                if share.index != expected:
                    raise SecAggProtocolError(
                        f"share of node {owner} from node {reply.node_id} has index "
                        f"{share.index}; expected {expected}"
                    )
                parsed.append((kind, owner, share))
        for kind, owner, share in parsed:
            target = self._seed_shares if kind == "seed" else self._key_shares
            target.setdefault(owner, []).append(share)
        self._replied.add(reply.node_id)

    # -- helpers -----------------------------------------------------------------------------

    def _live_neighbours(self, node: int) -> tuple[int, ...]:
        return tuple(j for j in self.graph[node] if j in self._live)

    def _components(self, nodes: Collection[int]) -> list[set[int]]:
        """Connected components of the graph induced on ``nodes``, largest first.

        Ties go to the component holding the smallest node id, so the choice is reproducible.
        """
        inside, seen, components = set(nodes), set(), []
        for start in sorted(inside):
            if start in seen:
                continue
            component, frontier = {start}, [start]
            while frontier:
                for j in self.graph[frontier.pop()]:
                    if j in inside and j not in component:
                        component.add(j)
                        frontier.append(j)
            seen |= component
            components.append(component)
        return sorted(components, key=lambda c: (-len(c), min(c)))

    def _prune(self) -> None:
        """Narrow the live nodes to a set every member of which could be in a released sum.

        Repeat to a fixed point: drop nodes with fewer than ``threshold`` live share holders
        (their secrets could not be reconstructed), then keep only the largest connected
        component (the others' masks could never cancel into one sum with it). Dropping weak
        nodes can split the graph; keeping a component never weakens its members (their
        neighbours are all inside it), so the loop ends after at most one more pass.
        """
        while True:
            while weak := {
                j for j in self._live if len(self._live_neighbours(j)) + 1 < self.threshold
            }:
                self._live -= weak
            components = self._components(self._live)
            if len(components) <= 1:
                return
            self._live = components[0]

    def _advance(self, current: Stage, following: Stage, *, prune: bool = True) -> None:
        if self.stage is not current:
            raise SecAggProtocolError(
                f"cannot start stage {following.value} from stage {self.stage.value}; the "
                "stages run once each: setup, share_keys, collect_masked_vectors, unmask"
            )
        if current is not Stage.INIT:
            self._live &= self._replied
        if prune:  # before anyone masks: only nodes that could be in a released sum go on
            self._prune()
        if len(self._live) < self.min_included:
            floor = (
                f"threshold {self.threshold}"
                if self.threshold >= self.min_sum
                else f"min_sum {self.min_sum} (the fewest sites a released sum may cover)"
            )
            self._abort(
                f"{len(self._live)} node(s) remain at stage {following.value}, fewer than {floor}"
            )
        self._replied = set()
        self.stage = following

    def _check_reply(self, reply: Any, stage: Stage) -> None:
        check_message(reply, round_id=self.round_id, node_id=None)
        node = reply.node_id
        if self.stage is not stage:
            raise SecAggProtocolError(
                f"{type(reply).__name__} from node {node} arrived in stage {self.stage.value}; "
                f"it belongs to stage {stage.value} (a late reply; the node counts as dropped)"
            )
        if not isinstance(node, int) or node not in self.graph:
            raise SecAggProtocolError(
                f"{type(reply).__name__} from node {node!r}, which is not a participant of "
                f"round {self.round_id} ({len(self.graph)} participants)"
            )
        if node not in self._live:
            raise SecAggProtocolError(
                f"{type(reply).__name__} from node {node}, which left the round before stage "
                f"{stage.value}"
            )
        if node in self._replied:
            raise SecAggProtocolError(
                f"duplicate {type(reply).__name__} from node {node} in stage {stage.value}"
            )

    def _reconstruct(self, owner: int, shares: list[shamir.Share], what: str) -> bytes:
        if len(shares) < self.threshold:
            self._abort(
                f"{len(shares)} share(s) of the {what} of node {owner} arrived, fewer than "
                f"threshold {self.threshold}"
            )
        try:
            secret = shamir.reconstruct(shares, threshold=self.threshold)
        except shamir.ShamirError as error:
            self._abort(f"cannot reconstruct the {what} of node {owner}: {error}")
        if len(secret) != masking.KEY_BYTES:
            self._abort(f"the reconstructed {what} of node {owner} has {len(secret)} bytes")
        return secret

    def _abort(self, reason: str) -> NoReturn:
        self.stage = Stage.ABORTED
        raise SecAggAbort(f"SecAgg+ round {self.round_id} aborted: {reason}; discard the round")
