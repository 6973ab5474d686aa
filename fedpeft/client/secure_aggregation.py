"""A site's handlers for the four SecAgg+ exchanges of a secure round.

This module owns the site's Flower side of secure aggregation: it reads the server's protocol
message from each request, runs :class:`~fedpeft.privacy.secagg.SecAggClient` one stage
further, and answers its reply. Between stages the client's state (private keys, Shamir
shares) lives in ``context.state`` under :data:`fedpeft.constants.SECAGG_STATE`, on the site
only: it is never put into a reply. The protocol is in :mod:`fedpeft.privacy.secagg`; the
server's side in :mod:`fedpeft.server.secure_aggregation`; the site's update, which the masked
stage masks, in :mod:`fedpeft.client.release`; :mod:`fedpeft.client.app` registers these
handlers.

In the masked stage the site trains only after checking that the request is the one its
state expects (right round, right stage), then clips its delta to the server's clip range,
quantises and masks it, and sends the uint32 vector plus its scalar figures (loss, seconds and
whatever else the training reports, e.g. ε, and the site's own declaration for the model card
when its node config sets one) but not its example count: under secure
aggregation sites weigh equally and the server does not learn how much data a site holds.
With ``secagg.mixed_ranks`` the vector ends with the site's ``lora.r`` rank-slot indicators
(exactly 0.0 or 1.0, see :mod:`fedpeft.ranks`), so the server learns per-slot site counts
only as a sum; the site's rank is then not reported in the clear.
How many values were clipped is logged here and never sent.

A request that breaks the protocol (wrong round, wrong stage, no round in progress, malformed
fields) raises, and the ClientApp's error mod (:func:`fedpeft.client.errors.error_reply_mod`)
turns every exception into an error reply the server records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)

from fedpeft import constants as K
from fedpeft.client.errors import SiteRefusal
from fedpeft.client.release import LocalUpdate
from fedpeft.client.rules import site_rules
from fedpeft.privacy.secagg import (
    EncryptedShares,
    MaskedVectorRequest,
    PublicKeys,
    SecAggClient,
    SecAggProtocolError,
    SetupRequest,
    ShareKeysRequest,
    Stage,
    UnmaskRequest,
    UnmaskShares,
)
from fedpeft.privacy.secagg_wire import decode, encode

__all__ = [
    "handle_masked",
    "handle_setup",
    "handle_share_keys",
    "handle_unmask",
]

logger = logging.getLogger(__name__)

Request = TypeVar("Request", SetupRequest, ShareKeysRequest, MaskedVectorRequest, UnmaskRequest)
Reply = TypeVar("Reply", PublicKeys, EncryptedShares, UnmaskShares)


def _request(cls: type[Request], msg: Message) -> Request:
    if K.SECAGG not in msg.content.config_records:
        raise SecAggProtocolError(
            f"the {msg.metadata.message_type} request lacks the {K.SECAGG!r} record"
        )
    return decode(cls, dict(msg.content.config_records[K.SECAGG]))


def _load(context: Context) -> SecAggClient:
    record = context.state.config_records.get(K.SECAGG_STATE)
    if record is None or K.SECAGG_STATE_CLIENT not in record:
        raise SecAggProtocolError(
            f"node {context.node_id} has no secure aggregation round in progress; a round "
            f"starts with a {K.SECAGG_SETUP} request"
        )
    return SecAggClient.from_state(bytes(record[K.SECAGG_STATE_CLIENT]))  # type: ignore[arg-type]


def _save(context: Context, client: SecAggClient) -> None:
    if client.stage is Stage.DONE:  # nothing left to keep: forget the round
        if K.SECAGG_STATE in context.state:
            del context.state[K.SECAGG_STATE]
        return
    context.state[K.SECAGG_STATE] = ConfigRecord({K.SECAGG_STATE_CLIENT: client.to_state()})


def _reply(message: Reply) -> RecordDict:
    return RecordDict({K.SECAGG: ConfigRecord(dict(encode(message).fields))})


def handle_setup(msg: Message, context: Context) -> RecordDict:
    """Stage setup: start a new round (replacing any unfinished one); answer public keys."""
    request = _request(SetupRequest, msg)
    floor = site_rules(context.node_config).secagg_min_sites
    if floor is not None and request.threshold < floor:
        raise SiteRefusal(
            K.ERR_SECAGG_REQUIRED,
            f"secure round with threshold {request.threshold}: a sum could rest on fewer than "
            f"this site's {K.NODE_SECAGG_MIN_SITES}={floor} sites; refused",
        )
    client = SecAggClient(node_id=int(context.node_id))
    reply = client.setup(request)
    _save(context, client)
    return _reply(reply)


def handle_share_keys(msg: Message, context: Context) -> RecordDict:
    """Stage share_keys: answer the encrypted shares of this site's secrets."""
    client = _load(context)
    reply = client.share_keys(_request(ShareKeysRequest, msg))
    _save(context, client)
    return _reply(reply)


def handle_masked(
    msg: Message,
    context: Context,
    *,
    train: Callable[[str], LocalUpdate],
    rank_slots: bool = False,
) -> RecordDict:
    """Stage masked: check the request, train (``train()``), answer the masked delta.

    Parameters
    ----------
    msg : Message
        The request: the plain train records (global adapter, train config) plus the shares
        addressed to this site under :data:`fedpeft.constants.SECAGG`.
    context : Context
        The site's context; its state holds the round's :class:`SecAggClient`.
    train : callable
        ``train(session)`` runs the local work of this request and returns its
        ``LocalUpdate``; called only once the request is known to belong to the round in
        progress. ``session`` (:attr:`SecAggClient.session_id`) is fresh in every secure
        session: it enters the release's binding, so the same instruction masked in another
        session (another group of sites) is another release with fresh noise.
    rank_slots : bool, default False
        Append the update's rank-slot indicators to the masked vector (``secagg.mixed_ranks``;
        the server's vector length then includes them).
    """
    client = _load(context)
    request = _request(MaskedVectorRequest, msg)
    client.check_request(request)
    update = train(client.session_id)
    vector = np.concatenate([update.delta, update.rank_slots]) if rank_slots else update.delta
    masked = client.collect_masked_vectors(
        request, update=vector, rng=np.random.default_rng(update.rounding_seed)
    )
    _save(context, client)
    if client.num_clipped:
        logger.warning(
            "node %d: %d of %d update values lay beyond the secure aggregation clip range and "
            "were clipped (raise secagg.clip_range if this recurs)",
            context.node_id,
            client.num_clipped,
            vector.size,
        )
    wire = encode(masked)
    figures: dict[str, MetricRecordValues] = {
        k: v for k, v in update.metrics.items() if k not in (K.MET_NUM_EXAMPLES, K.MET_LORA_RANK)
    }
    content = RecordDict(
        {
            K.SECAGG: ConfigRecord(dict(wire.fields)),
            K.SECAGG_ARRAYS: ArrayRecord({name: Array(v) for name, v in wire.arrays.items()}),
            K.METRICS: MetricRecord(figures),
        }
    )
    if update.declaration:  # what the site chose to publish (train updates only)
        content[K.DECLARATION] = ConfigRecord(dict(update.declaration))
    return content


def handle_unmask(msg: Message, context: Context) -> RecordDict:
    """Stage unmask: answer the shares the server may have; the round ends at this site."""
    client = _load(context)
    reply = client.unmask(_request(UnmaskRequest, msg))
    _save(context, client)
    return _reply(reply)
