"""How the sites' updates reach the server: in the clear, or securely aggregated.

An aggregation runs the training exchange(s) of one round and returns the sites'
mean delta plus who took part, and the evaluation exchange(s) that return the held-out
figures of a global adapter. :class:`PlainAggregation` sends one train message per
site and averages the validated replies weighted by their example counts (per LoRA rank
slot when sites train different ranks, see :mod:`fedpeft.ranks`);
``fedpeft.server.secure_aggregation.SecureAggregation`` runs SecAgg+ so the server
sees only the sum — of the updates, and of the evaluation figures. Both give the same
:class:`RoundOutcome` and :class:`EvalOutcome`, so the round loop and the strategies do not
know which one ran. With a :class:`~fedpeft.instructions.Signer` every train and evaluate
instruction carries the coordinator's signature.
"""

from __future__ import annotations

import hashlib
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from numpy.typing import NDArray

from fedpeft import constants as K
from fedpeft.broadcast import Broadcast
from fedpeft.instructions import Signer
from fedpeft.model import AdapterLayout
from fedpeft.ranks import layout_rank, nonzero_beyond_rank, slot_weighted_mean
from fedpeft.server.validation import ReplyRejected, TrainReply, check_train_reply

logger = logging.getLogger(__name__)


def _canonical_key(reply: TrainReply) -> tuple[int, bytes]:
    """An order for summing updates that depends on them only (examples, then content)."""
    return reply.num_examples, hashlib.sha256(reply.delta.tobytes()).digest()


@dataclass
class RoundOutcome:
    """What the training exchange of one round produced."""

    mean_delta: NDArray[np.float32] | None  # trained layout; None when too few sites
    contributors: list[int]  # node ids whose updates are in mean_delta
    failures: dict[str, str] = field(default_factory=dict)  # node id → reason
    dropped: list[int] = field(default_factory=list)  # no answer at all
    train_loss: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    site_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # node id → figures
    # secure aggregation only: the round's k (neighbours), t (threshold) and smallest sum
    secagg_params: dict[str, int] = field(default_factory=dict)
    # node id → what the site chose to publish about its data ({}: nothing), contributors only
    declarations: dict[str, dict[str, str | int]] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundRequest:
    """What the round loop asks an aggregation to do."""

    round_number: int
    nodes: Sequence[int]
    global_flat: NDArray[np.float32]
    trained: AdapterLayout
    min_sites: int
    timeout: float
    # Sent with every train instruction; sites key their privacy ledger by it (empty: by
    # Flower's run id). Fixed for a federation's life, so a resumed round is not charged twice.
    federation_id: str = ""
    # global_flat as it goes on the wire (fedpeft.broadcast); None sends the whole adapter
    broadcast: Broadcast | None = None
    signer: Signer | None = None  # signs every instruction when the coordinator has a key

    @property
    def bytes_down_per_site(self) -> int:
        values = self.broadcast.values if self.broadcast is not None else self.global_flat
        return int(values.nbytes)


def adapter_content(
    flat: NDArray[np.float32], broadcast: Broadcast | None, config: dict[str, Any]
) -> RecordDict:
    """A message carrying the global adapter ``flat`` — as ``broadcast`` when given (the
    sent tensors, their names and the digest of the rest) — and ``config`` in CONFIG."""
    values, entries = flat, dict(config)
    if broadcast is not None:
        values = broadcast.values
        entries[K.CFG_SENT_NAMES] = list(broadcast.sent)
        entries[K.CFG_DERIVED_DIGEST] = broadcast.derived_digest
    return RecordDict(
        {K.ARRAYS: ArrayRecord({K.ARRAY_FLAT: Array(values)}), K.CONFIG: ConfigRecord(entries)}
    )


def train_content(request: RoundRequest) -> RecordDict:
    """The train instruction: global adapter plus which tensors to train (signed)."""
    content = adapter_content(
        request.global_flat,
        request.broadcast,
        {
            K.CFG_ROUND: request.round_number,
            K.CFG_TRAIN_NAMES: list(request.trained.names),
            K.CFG_FEDERATION_ID: request.federation_id,
            K.CFG_TASK: K.TASK_TRAIN,
        },
    )
    if request.signer is not None:
        request.signer.sign(content, task=K.TASK_TRAIN)
    return content


@dataclass(frozen=True)
class EvalRequest:
    """What the round loop asks an aggregation to evaluate: the global adapter after a round,
    at sites that trained in it (a site evaluates only a round it was charged for)."""

    round_number: int
    nodes: Sequence[int]
    global_flat: NDArray[np.float32]
    broadcast: Broadcast | None
    federation_id: str
    timeout: float
    min_sites: int
    signer: Signer | None = None

    @property
    def bytes_down_per_site(self) -> int:
        values = self.broadcast.values if self.broadcast is not None else self.global_flat
        return int(values.nbytes)


@dataclass
class EvalOutcome:
    """Held-out figures of one global adapter, over the sites that evaluated it."""

    loss: float | None = None
    accuracy: float | None = None
    sites: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # node id → reason
    # node id → [(prompt, answer)]: plain evaluation, sites that published prompts only
    generations: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


def site_generations(reply: Message) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs a site sent with its evaluation (``[]``: none).

    A malformed record (not two lists of str of equal length, too many prompts, a prompt
    or an answer too long) is dropped with a warning; the figures stand.
    """
    record = reply.content.config_records.get(K.GENERATIONS)
    if record is None:
        return []
    prompts, answers = record.get(K.GEN_PROMPTS), record.get(K.GEN_ANSWERS)
    # an answer is at most MAX_NEW_TOKENS_MAX tokens; 64 characters a token is generous
    longest = 64 * K.MAX_NEW_TOKENS_MAX
    if (
        isinstance(prompts, list)
        and isinstance(answers, list)
        and len(prompts) == len(answers) <= K.EVAL_PROMPTS_MAX
        and all(isinstance(p, str) and len(p) <= K.EVAL_PROMPT_CHARS_MAX for p in prompts)
        and all(isinstance(a, str) and len(a) <= longest for a in answers)
    ):
        return list(zip(prompts, answers, strict=True))  # type: ignore[arg-type]
    logger.warning(
        "generated answers of site %d dropped: %s must hold two lists of str of equal length "
        "(at most %d prompts of %d characters)",
        reply.metadata.src_node_id,
        K.GENERATIONS,
        K.EVAL_PROMPTS_MAX,
        K.EVAL_PROMPT_CHARS_MAX,
    )
    return []


def evaluate_content(request: EvalRequest, *, task_key: bool = False) -> RecordDict:
    """The evaluate instruction: the global adapter, the round and federation (signed).

    ``task_key`` adds ``task=evaluate`` (a secure round's masked stage needs it to tell an
    evaluation from a training).
    """
    entries: dict[str, Any] = {
        K.CFG_ROUND: request.round_number,
        K.CFG_FEDERATION_ID: request.federation_id,
    }
    if task_key:
        entries[K.CFG_TASK] = K.TASK_EVALUATE
    content = adapter_content(request.global_flat, request.broadcast, entries)
    if request.signer is not None:
        request.signer.sign(content, task=K.TASK_EVALUATE)
    return content


def site_figures(reply: Message) -> dict[str, Any]:
    """The scalar figures a site reported next to its update (loss, ε, …)."""
    metrics = reply.content.metric_records.get(K.METRICS)
    if metrics is None:
        return {}
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def site_declaration(reply: Message) -> dict[str, str | int]:
    """What a site published about its data with its train reply (``{}``: nothing).

    A malformed declaration is dropped with a warning; the update itself stands.
    """
    from fedpeft.model_card import parse_declaration

    record = reply.content.config_records.get(K.DECLARATION)
    if record is None:
        return {}
    node = reply.metadata.src_node_id
    try:
        return parse_declaration(dict(record), source=f"site {node}'s declaration")
    except ValueError as err:
        logger.warning("declaration of site %d dropped: %s", node, err)
        return {}


def reported_rank(reply: Message, checked: TrainReply, trained: AdapterLayout) -> int:
    """The LoRA rank a site trained: ``lora-rank`` in its figures, by default the full rank.

    Raises
    ------
    ReplyRejected
        If the rank is not an int in ``[1, lora.r]``, or the delta holds non-zero values in
        rank slots the site says it did not train.
    """
    full = layout_rank(trained)
    figures = site_figures(reply)
    if K.MET_LORA_RANK not in figures or full == 0:  # 0: a round of the head alone
        return full
    rank = figures[K.MET_LORA_RANK]
    if not isinstance(rank, int) or not 1 <= rank <= full:
        raise ReplyRejected(
            f"node {checked.node_id}: {K.MET_LORA_RANK}={rank!r} is not an int in [1, {full}]"
        )
    stray = nonzero_beyond_rank(checked.delta, trained, rank)
    if stray:
        raise ReplyRejected(
            f"node {checked.node_id}: {K.MET_LORA_RANK}={rank} but {stray} non-zero values in "
            f"rank slots >= {rank}"
        )
    return rank


class Aggregation(ABC):
    """The training and evaluation exchanges of a round."""

    @abstractmethod
    def run_round(self, grid: Grid, request: RoundRequest) -> RoundOutcome:
        """Send the round's instructions, collect updates, return their mean."""

    @abstractmethod
    def evaluate(self, grid: Grid, request: EvalRequest) -> EvalOutcome:
        """Ask sites to evaluate the global adapter; return the combined figures."""


class PlainAggregation(Aggregation):
    """One train message per site; replies validated and averaged by example count.

    A site of rank ``r_i < lora.r`` reports ``lora-rank``; each rank slot ``k`` is averaged
    over the sites with ``r_i > k`` only (:func:`fedpeft.ranks.slot_weighted_mean`), which is
    the plain weighted mean when every site has the full rank.
    """

    def run_round(self, grid: Grid, request: RoundRequest) -> RoundOutcome:
        content = train_content(request)
        messages = [
            Message(
                content=content,
                dst_node_id=n,
                message_type=MessageType.TRAIN,
                group_id=str(request.round_number),  # Flower logs it: "[RUN r, ROUND g]"
            )
            for n in request.nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=request.timeout))
        accepted: list[TrainReply] = []
        ranks: list[int] = []  # the LoRA rank each accepted site trained
        outcome = RoundOutcome(
            mean_delta=None,
            contributors=[],
            bytes_down=request.bytes_down_per_site * len(request.nodes),
        )
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                outcome.failures[str(node)] = str(reply.error.reason)
                logger.warning(
                    "round %d: site %d failed: %s", request.round_number, node, reply.error.reason
                )
                continue
            try:
                checked = check_train_reply(reply, request.trained)
                ranks.append(reported_rank(reply, checked, request.trained))
                accepted.append(checked)
                outcome.site_metrics[str(node)] = site_figures(reply)
                outcome.declarations[str(node)] = site_declaration(reply)
            except ReplyRejected as err:
                outcome.failures[str(node)] = f"rejected: {err}"
                logger.warning("round %d: update rejected: %s", request.round_number, err)
        answered = {r.metadata.src_node_id for r in replies}
        outcome.dropped = [n for n in request.nodes if n not in answered]
        # Replies arrive in any order and node ids are drawn anew in every simulation: sum in
        # an order fixed by the updates themselves, so a float sum does not vary run to run.
        order = sorted(range(len(accepted)), key=lambda i: _canonical_key(accepted[i]))
        accepted, ranks = [accepted[i] for i in order], [ranks[i] for i in order]
        outcome.contributors = [r.node_id for r in accepted]
        outcome.bytes_up = sum(r.bytes_up for r in accepted)
        reported = [r for r in accepted if math.isfinite(r.train_loss)]  # none under DP
        if reported:
            outcome.train_loss = float(
                np.average(
                    [r.train_loss for r in reported], weights=[r.num_examples for r in reported]
                )
            )
        if len(accepted) >= request.min_sites:
            outcome.mean_delta = slot_weighted_mean(
                [r.delta for r in accepted],
                [r.num_examples for r in accepted],
                ranks,
                request.trained,
            )
        return outcome

    def evaluate(self, grid: Grid, request: EvalRequest) -> EvalOutcome:
        """One evaluate message per site; figures averaged by held-out example count."""
        messages = [
            Message(
                content=evaluate_content(request),
                dst_node_id=n,
                message_type=MessageType.EVALUATE,
                group_id=str(request.round_number),
            )
            for n in request.nodes
        ]
        outcome = EvalOutcome(bytes_down=request.bytes_down_per_site * len(request.nodes))
        losses, accuracies, weights = [], [], []
        for reply in grid.send_and_receive(messages, timeout=request.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                outcome.failures[str(node)] = str(reply.error.reason)
                logger.warning(
                    "round %d: evaluation failed at site %d: %s",
                    request.round_number,
                    node,
                    reply.error.reason,
                )
                continue
            m = reply.content.metric_records.get(K.METRICS)
            count = m.get(K.MET_NUM_EXAMPLES) if m is not None else None
            if m is None or not isinstance(count, int) or count < 1:
                continue
            loss, accuracy = m.get(K.MET_EVAL_LOSS), m.get(K.MET_EVAL_ACCURACY)
            if not (isinstance(loss, float) and isinstance(accuracy, float)):
                continue
            losses.append(loss)
            accuracies.append(accuracy)
            weights.append(count)
            pairs = site_generations(reply)
            if pairs:
                outcome.generations[str(node)] = pairs
        if weights:
            outcome.loss = float(np.average(losses, weights=weights))
            outcome.accuracy = float(np.average(accuracies, weights=weights))
            outcome.sites = len(weights)
        return outcome
