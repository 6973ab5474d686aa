"""Secure aggregation (SecAgg+) of the sites' adapter deltas over Flower's ``Grid``.

This module owns the server's Flower side of a secure round: it drives
:class:`~fedpeft.privacy.secagg.SecAggServer` through four exchanges, one
``grid.send_and_receive`` each, with message types ``train.<action>`` for the actions in
:mod:`fedpeft.constants` (``secagg_setup``, ``secagg_share_keys``, ``secagg_masked``,
``secagg_unmask``); it validates every reply, records failures, drops and bytes, and turns the
unmasked sum into the round's mean delta. The protocol and its cryptography are in
:mod:`fedpeft.privacy.secagg`; the sites' handlers in :mod:`fedpeft.client.secure_aggregation`.

1. setup: each sampled site gets the round id, its neighbours, the threshold, the vector length
   (size of the trained layout) and the quantisation parameters; it answers two public keys.
2. share_keys: each site gets its neighbours' keys and answers encrypted Shamir shares.
3. masked: each site gets the global adapter and train config (the records of a plain train
   message, :func:`~fedpeft.server.aggregation.train_content`) plus the shares addressed to it;
   it trains, clips its delta to ``±secagg.clip_range``, quantises and masks it, and answers a
   uint32 vector (4 bytes per trained parameter) and its public DP figures (ε, σ, q, …) —
   nothing that depends on its data or its example count.
4. unmask: survivors reveal the shares that remove the masks of the sum, and no more. The
   server asks for no share unless the survivors are connected and at least
   ``max(threshold, federation.min_sites)`` (:class:`~fedpeft.privacy.secagg.SecAggServer`
   ``min_sum``): it never unmasks a partial sum, nor one of too few sites.

**Evaluation is a secure sum too** (:meth:`SecureAggregation.evaluate`): the same four stages
with a three-element vector per site, ``c · (accuracy, min(loss, cap) / cap, 1)``
(:func:`fedpeft.client.release.secure_evaluation`), under its own round id; the server learns the
mean figures over the sites that evaluated and how many did, never one site's.

**Weighting is uniform.** The mean delta is ``sum / count`` over the sites whose masked vectors
are in the sum: each site weighs the same whatever its example count, so the server never
learns a site's example count from its update (sites do not report it under secure aggregation;
:class:`~fedpeft.server.aggregation.PlainAggregation` weighs by example count). Sites send no
train loss under secure aggregation, so the round has none.

**Mixed LoRA ranks** (``secagg.mixed_ranks``): every masked vector ends with ``lora.r``
rank-slot indicators, exactly 0.0 or 1.0 (a site of rank ``r_i`` sends 1 for slots ``< r_i``,
:func:`fedpeft.ranks.rank_indicator`). They lie within the clip range (``clip_range >= 1`` is
required), so the secure sum carries each slot's site count next to the sum of the zero-padded
deltas; the counts are rounded to integers (quantisation error < 1e-6) and each rank slot is
divided by its own count, :func:`fedpeft.ranks.slot_mean`. A slot no site trained gets a zero
mean delta. The server learns the per-slot counts, not which site trained which rank.

A missing reply means the site dropped; an error reply or a reply the protocol rejects
(malformed, wrong length or dtype, wrong round, duplicate) counts as dropped too and is recorded
in ``RoundOutcome.failures`` with the reason. SecAgg+ recovers from drops at every stage while at
least ``threshold`` sites remain; otherwise the round is abandoned (``mean_delta`` None, one log
line ``round N abandoned: …``) and the federation goes on with the next round. A configuration
that cannot work (one site, an impossible neighbour count) raises ``SecAggConfigError``.

Round ids bind every key and ciphertext to one round: ``(random 32-bit run salt << 32) |
evaluation bit << 31 | round number``, so no two rounds of one run and (but with probability
2^-32) no two runs share one. Bytes count the payload actually sent: array elements and byte
strings (keys, ciphertexts, shares); ints, strings and record overhead are not counted, as in
``PlainAggregation``. Timeouts: the masked stage includes local training and waits
``federation.round_timeout``; the other three wait ``secagg.stage_timeout``.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from numpy.typing import NDArray

from fedpeft import constants as K
from fedpeft.config import SecAggConfig
from fedpeft.privacy.secagg import (
    EncryptedShares,
    MaskedVector,
    PublicKeys,
    SecAggAbort,
    SecAggConfigError,
    SecAggProtocolError,
    SecAggResult,
    SecAggServer,
    UnmaskShares,
)
from fedpeft.privacy.secagg_wire import decode, encode
from fedpeft.ranks import layout_rank, slot_mean
from fedpeft.server.aggregation import (
    Aggregation,
    EvalOutcome,
    EvalRequest,
    RoundOutcome,
    RoundRequest,
    evaluate_content,
    site_declaration,
    site_figures,
    train_content,
)

__all__ = ["SecureAggregation", "payload_bytes"]

logger = logging.getLogger(__name__)

Reply = TypeVar("Reply", PublicKeys, EncryptedShares, MaskedVector, UnmaskShares)


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the arrays' elements and of the byte strings in ``content``'s config records."""
    total = 0
    for record in content.array_records.values():
        for array in record.values():
            total += np.dtype(array.dtype).itemsize * math.prod(array.shape)
    for config in content.config_records.values():
        for value in config.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


def _reply_message(cls: type[Reply], reply: Message, *, node: int) -> Reply:
    """The protocol message in a site's reply, checked for form and sender."""
    content = reply.content
    if K.SECAGG not in content.config_records:
        raise SecAggProtocolError(f"the reply of node {node} lacks the {K.SECAGG!r} record")
    fields: dict[str, object] = dict(content.config_records[K.SECAGG])
    arrays: dict[str, object] = {}
    for name, array in content.array_records.get(K.SECAGG_ARRAYS, {}).items():
        if array.dtype != "uint32" or len(array.shape) != 1:
            raise SecAggProtocolError(
                f"array {name!r} from node {node} has dtype {array.dtype} and shape "
                f"{array.shape}; only a 1-D uint32 masked vector is accepted"
            )
        try:
            arrays[name] = array.numpy()
        except Exception as error:  # malformed array bytes from the network
            raise SecAggProtocolError(f"array {name!r} from node {node}: {error}") from error
    message = decode(cls, fields, arrays)
    if message.node_id != node:
        raise SecAggProtocolError(
            f"a reply sent by node {node} claims to come from node {message.node_id}"
        )
    return message


@dataclass
class _Exchanges:
    """The stages of one round on the grid, and what they cost: failures, drops, bytes."""

    grid: Grid
    round_number: int
    reasons: dict[int, str] = field(default_factory=dict)  # first failure of each node
    missing: set[int] = field(default_factory=set)  # sent a request, got no reply
    bytes_up: int = 0
    bytes_down: int = 0
    figures: dict[int, dict[str, Any]] = field(default_factory=dict)  # masked-stage metrics
    # the round's SecAgg+ parameters as the server resolved them: k, t, the smallest sum
    params: dict[str, int] = field(default_factory=dict)
    declarations: dict[int, dict[str, str | int]] = field(default_factory=dict)  # site-* keys

    def run(
        self,
        action: str,
        requests: Mapping[int, Any],
        receive: Callable[[Reply], None],
        reply_type: type[Reply],
        *,
        timeout: float,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """One stage: send each node its request, feed every usable reply to ``receive``.

        ``extra`` records (the train instruction) go with every request. A reply the protocol
        rejects is recorded against its node unless an earlier reply of the node was accepted
        (a duplicate), which stands.
        """
        messages = []
        for node, protocol_request in requests.items():
            wire = encode(protocol_request)
            content = RecordDict({**(extra or {}), K.SECAGG: ConfigRecord(dict(wire.fields))})
            self.bytes_down += payload_bytes(content)
            message_type = f"{MessageType.TRAIN}.{action}"
            messages.append(
                Message(
                    content=content,
                    dst_node_id=node,
                    message_type=message_type,
                    group_id=str(self.round_number),
                )
            )
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        where = f"round {self.round_number} {action}"
        answered, accepted = set(), set()
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            answered.add(node)
            if node not in requests:
                logger.warning("%s: ignored a reply from node %d, which was not asked", where, node)
                continue
            if reply.has_error():
                self.reasons.setdefault(node, str(reply.error.reason))  # as PlainAggregation
                logger.warning("%s: site %d failed: %s", where, node, reply.error.reason)
                continue
            self.bytes_up += payload_bytes(reply.content)
            try:
                receive(_reply_message(reply_type, reply, node=node))
            except SecAggProtocolError as error:
                if node in accepted:
                    logger.warning("%s: ignored a second reply of node %d: %s", where, node, error)
                else:
                    self.reasons.setdefault(node, f"rejected at {action}: {error}")
                    logger.warning("%s: reply of node %d rejected: %s", where, node, error)
                continue
            accepted.add(node)
            if reply_type is MaskedVector:
                self.figures[node] = site_figures(reply)
                self.declarations[node] = site_declaration(reply)
        self.missing |= set(requests) - answered
        logger.debug("%s: %d of %d site(s) accepted", where, len(accepted), len(requests))


def _config_problems(config: SecAggConfig) -> list[str]:
    problems = []
    if not (isinstance(config.clip_range, int | float) and 0 < config.clip_range < math.inf):
        problems.append(
            f"secagg.clip_range={config.clip_range!r} must be a finite number > 0 (the largest "
            "absolute update element to keep, e.g. 1.0)"
        )
    for name in ("num_neighbours", "threshold"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            problems.append(
                f"secagg.{name}={value!r} must be null (the SecAgg+ default for the number of "
                "sampled sites) or an int >= 1"
            )
    if config.mixed_ranks and not config.clip_range >= 1.0:
        problems.append(
            f"secagg.mixed_ranks=true with secagg.clip_range={config.clip_range!r}: the 0/1 "
            "rank-slot indicators need clip_range >= 1; set secagg.clip_range=1.0"
        )
    if not config.stage_timeout > 0:
        problems.append(f"secagg.stage_timeout={config.stage_timeout!r} must be > 0 seconds")
    return problems


class SecureAggregation(Aggregation):
    """SecAgg+ over four exchanges per round; the server sees only the sum of the updates.

    Parameters
    ----------
    config : SecAggConfig
        ``clip_range`` bounds each update element before quantisation; ``num_neighbours`` and
        ``threshold`` (None: the SecAgg+ defaults for the number of sampled sites) shape the
        neighbour graph; ``stage_timeout`` is the wait of the setup, share_keys and unmask
        exchanges, in seconds.

    Raises
    ------
    SecAggConfigError
        If a setting is invalid (all problems in one message).
    """

    def __init__(self, config: SecAggConfig) -> None:
        problems = _config_problems(config)
        if problems:
            raise SecAggConfigError("invalid secure aggregation settings: " + "; ".join(problems))
        self.config = config
        self.run_salt = secrets.randbits(32)  # per run: round ids never repeat across runs

    def round_id(self, round_number: int, *, evaluation: bool = False) -> int:
        """The protocol's round id for ``round_number`` (unique per round, kind and run).

        A round's secure evaluation gets its own id (top bit of the low word set), so its
        keys and shares can never be mistaken for the training's.
        """
        if not 0 <= round_number < 2**31:
            raise ValueError(f"round_number={round_number} must be in [0, 2^31)")
        return (self.run_salt << 32) | (2**31 if evaluation else 0) | round_number

    def _secure_sum(
        self,
        grid: Grid,
        *,
        round_number: int,
        nodes: list[int],
        vector_length: int,
        min_sum: int,
        timeout: float,
        extra: Mapping[str, Any],
        evaluation: bool = False,
    ) -> tuple[SecAggResult | None, _Exchanges]:
        """The four SecAgg+ stages over ``nodes``; the unmasked sum, or None if abandoned.

        ``extra`` (the train or evaluate instruction) goes with the masked-stage request,
        whose replies wait ``timeout``; the other stages wait ``secagg.stage_timeout``.
        """
        try:
            server = SecAggServer(
                round_id=self.round_id(round_number, evaluation=evaluation),
                node_ids=nodes,
                vector_length=vector_length,
                clip=float(self.config.clip_range),
                num_neighbours=self.config.num_neighbours,
                threshold=self.config.threshold,
                min_sum=min_sum,  # unmask() refuses a smaller sum before any share
            )
        except SecAggConfigError as error:
            raise SecAggConfigError(
                f"round {round_number} sampled {len(nodes)} site(s), which the secure "
                f"aggregation settings cannot serve ({error}); set federation.min_sites >= 2 "
                "and secagg.num_neighbours / secagg.threshold to null or to values that fit"
            ) from error
        stages = _Exchanges(grid, round_number)
        stages.params = {
            "num_neighbours": int(server.num_neighbours),
            "threshold": int(server.threshold),
            "min_sum": int(server.min_sum),
        }
        wait = float(self.config.stage_timeout)
        try:
            stages.run(
                K.SECAGG_SETUP, server.setup(), server.receive_public_keys, PublicKeys, timeout=wait
            )
            stages.run(
                K.SECAGG_SHARE_KEYS,
                server.share_keys(),
                server.receive_encrypted_shares,
                EncryptedShares,
                timeout=wait,
            )
            stages.run(
                K.SECAGG_MASKED,
                server.collect_masked_vectors(),
                server.receive_masked_vector,
                MaskedVector,
                timeout=timeout,
                extra=extra,
            )
            stages.run(
                K.SECAGG_UNMASK,
                server.unmask(),
                server.receive_unmask_shares,
                UnmaskShares,
                timeout=wait,
            )
            result = server.result()
        except SecAggAbort as error:
            what = "secure evaluation of round" if evaluation else "round"
            logger.warning("%s %d abandoned: %s", what, round_number, error)
            return None, stages
        if len(result.included) < min_sum:
            # Defensive, never expected: SecAggServer(min_sum=min_sites) aborts in unmask()
            # before requesting any share when fewer survivors remain, and result() covers
            # exactly those survivors. Reaching this means the server unmasked a sum it must
            # not have (a bug in SecAggServer): discard it and say so loudly.
            logger.error(
                "round %d: %d site(s) in the secure sum, below federation.min_sites=%d; "
                "SecAggServer should have refused to unmask; sum discarded",
                round_number,
                len(result.included),
                min_sum,
            )
            return None, stages
        return result, stages

    def run_round(self, grid: Grid, request: RoundRequest) -> RoundOutcome:
        """Run the four SecAgg+ stages of one round; return the uniform mean delta."""
        nodes = [int(n) for n in request.nodes]
        # With mixed ranks each vector ends with one 0/1 indicator per LoRA rank slot.
        slots = layout_rank(request.trained) if self.config.mixed_ranks else 0
        result, stages = self._secure_sum(
            grid,
            round_number=request.round_number,
            nodes=nodes,
            vector_length=request.trained.size + slots,
            min_sum=request.min_sites,
            timeout=request.timeout,
            extra=_records(train_content(request)),
        )
        if result is None:
            return _outcome(nodes, included=(), stages=stages)
        outcome = _outcome(nodes, included=result.included, stages=stages)
        count = len(result.included)
        if slots:
            outcome.mean_delta = _slot_mean(result.total, count, request, slots)
        else:
            outcome.mean_delta = (result.total / count).astype(np.float32)
        return outcome

    def evaluate(self, grid: Grid, request: EvalRequest) -> EvalOutcome:
        """A secure sum of the sites' held-out figures: the server learns only their means.

        Each site masks ``(c · accuracy, c · min(loss, cap) / cap, c)``
        (:func:`fedpeft.client.release.secure_evaluation`); the sum's last element over ``c``
        counts the sites that evaluated, so the means are uniform over those sites.
        """
        nodes = [int(n) for n in request.nodes]
        result, stages = self._secure_sum(
            grid,
            round_number=request.round_number,
            nodes=nodes,
            vector_length=3,
            min_sum=request.min_sites,
            timeout=request.timeout,
            extra=_records(evaluate_content(request, task_key=True)),
            evaluation=True,
        )
        outcome = EvalOutcome(
            bytes_down=stages.bytes_down,
            bytes_up=stages.bytes_up,
            failures={str(n): reason for n, reason in stages.reasons.items()},
        )
        if result is None:
            return outcome
        c = float(self.config.clip_range)
        accuracy_sum, loss_sum, count = (float(v) / c for v in result.total)
        evaluated = round(count)
        if evaluated < 1 or abs(count - evaluated) > 1e-3 or evaluated > len(result.included):
            logger.warning(
                "round %d: the secure evaluation's site count %.4f is not an integer in "
                "[1, %d]; figures discarded",
                request.round_number,
                count,
                len(result.included),
            )
            return outcome
        outcome.accuracy = accuracy_sum / evaluated
        outcome.loss = loss_sum * K.EVAL_LOSS_CAP / evaluated
        outcome.sites = evaluated
        return outcome


def _slot_mean(
    total: NDArray[np.float64], count: int, request: RoundRequest, slots: int
) -> NDArray[np.float32] | None:
    """The per-slot uniform mean from a secure sum that ends with ``slots`` indicator sums."""
    size = request.trained.size
    counts = np.rint(total[size:])  # sums of exact 0/1 indicators, off by quantisation only
    if total.shape != (size + slots,) or not ((counts >= 0) & (counts <= count)).all():
        logger.warning(
            "round %d: rank-slot counts %s are not in [0, %d]; sum discarded",
            request.round_number,
            counts.tolist(),
            count,
        )
        return None
    return slot_mean(total[:size], slot_weights=counts, total_weight=count, layout=request.trained)


def _records(content: RecordDict) -> dict[str, Any]:
    """The records of a plain train or evaluate message (global adapter, config), by key."""
    return {**content.array_records, **content.config_records}


def _outcome(nodes: list[int], *, included: tuple[int, ...], stages: _Exchanges) -> RoundOutcome:
    """The round's bookkeeping; ``mean_delta`` is left to the caller."""
    inside = set(included)
    outside = [n for n in nodes if n not in inside]
    figures = {node: stages.figures.get(node, {}) for node in included}
    losses = [float(f[K.MET_TRAIN_LOSS]) for f in figures.values() if K.MET_TRAIN_LOSS in f]
    losses = [loss for loss in losses if math.isfinite(loss)]
    return RoundOutcome(
        mean_delta=None,
        contributors=list(included),
        failures={str(n): stages.reasons[n] for n in outside if n in stages.reasons},
        dropped=[n for n in outside if n in stages.missing and n not in stages.reasons],
        train_loss=float(np.mean(losses)) if losses else None,
        bytes_up=stages.bytes_up,
        bytes_down=stages.bytes_down,
        site_metrics={str(node): f for node, f in figures.items()},
        secagg_params=dict(stages.params),
        declarations={str(node): stages.declarations.get(node, {}) for node in included},
    )
