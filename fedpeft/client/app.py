"""The fedpeft ClientApp: a site's answer to the server's train and evaluate messages.

A site receives the global adapter as one flat float32 array, trains the tensors the
strategy names on its own data, and replies with the *delta* of exactly those tensors,
their names and sizes, and a few figures. Base weights, raw data and per-example
gradients never leave the site. A failure becomes an error reply the server records.

``app`` (the module attribute) is what Flower loads in a real deployment; it reads its
configuration from the run config. :func:`make_client_app` with a configuration is what
``fedpeft simulate`` hands to Flower's simulation engine; both run the same handlers.

The site's model, data and training code (torch, transformers, peft, Opacus) are imported
when a handler first needs them, not with this module: a deployed SuperNode starts a fresh
process per message, and three of the four secure-aggregation stages need none of them.

A round is charged to the site's privacy ledger under the federation id the server sends
(:data:`fedpeft.constants.CFG_FEDERATION_ID`), which stays the same when a crashed server
resumes the federation under a new Flower run id.
"""

from __future__ import annotations

import hashlib
import logging
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from numpy.typing import NDArray

from fedpeft import constants as K
from fedpeft.client import secure_aggregation as secure
from fedpeft.config import FedPeftConfig, from_run_config

if TYPE_CHECKING:  # imported where used: see the module docstring
    from fedpeft.client.site import Site
    from fedpeft.model import AdapterLayout

logger = logging.getLogger(__name__)
_FEDERATION_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def ledger_run_id(msg: Message) -> str:
    """The key of this round's federation in the site's ledger: the server's federation id.

    A server that sends none (an older fedpeft) gets Flower's run id, as before.
    """
    value = msg.content.config_records[K.CONFIG].get(K.CFG_FEDERATION_ID, "")
    if not value:
        return str(msg.metadata.run_id)
    if not isinstance(value, str) or not _FEDERATION_ID.fullmatch(value):
        raise ValueError(
            f"train instruction has {K.CFG_FEDERATION_ID}={value!r}; allowed: 1 to 128 letters, "
            "digits, '.', '_' or '-' (the server and this site run different fedpeft versions)"
        )
    return value


def _global_flat(msg: Message, site: Site) -> NDArray[np.float32]:
    """The global adapter in ``msg``, rebuilt and checked, cut to this site's LoRA rank.

    The server leaves out LoRA factors still at their shared start (:mod:`fedpeft.broadcast`);
    a message without ``sent-names`` carries the whole adapter.
    """
    from fedpeft.broadcast import Broadcast, decode
    from fedpeft.ranks import slice_to_rank

    values = msg.content.array_records[K.ARRAYS][K.ARRAY_FLAT].numpy()
    entries = msg.content.config_records[K.CONFIG]
    layout = site.global_layout
    if K.CFG_SENT_NAMES in entries:
        broadcast = Broadcast(
            values=values,
            sent=tuple(str(n) for n in entries[K.CFG_SENT_NAMES]),  # type: ignore[union-attr]
            derived_digest=str(entries.get(K.CFG_DERIVED_DIGEST, "")),
        )
        flat = decode(broadcast, layout, seed=site.config.seed)
    elif values.dtype != np.float32 or values.shape != (layout.size,):
        raise ValueError(
            f"global adapter has dtype {values.dtype} and shape {values.shape}, but this site's "
            f"model expects float32 ({layout.size},): site and server run different "
            "model or LoRA settings."
        )
    else:
        flat = values
    return slice_to_rank(flat, layout, site.rank)


@dataclass(frozen=True)
class LocalUpdate:
    """A site's update for one round, before it is packed or masked."""

    delta: NDArray[np.float32]  # laid out as ``layout``
    layout: AdapterLayout  # the trained tensors at the federation's rank lora.r
    metrics: dict[str, int | float]  # figures reported next to the update
    rank_slots: NDArray[np.float32]  # (lora.r,) 1.0 for the rank slots this site trained, else 0


def local_update(msg: Message, site: Site) -> LocalUpdate:
    """Train on the site's data as the train instruction ``msg`` asks; return the delta.

    With ``privacy.enabled`` the round is first charged to the site's privacy ledger —
    refused (``BudgetExceededError``, nothing trained) when it would cross the site's
    ceiling — and then trained with DP-SGD; the reply reports ε spent so far.

    A site of rank ``r_i < lora.r`` trains the leading block of the global factors and pads
    its delta with zeros to the global trained layout (:mod:`fedpeft.ranks`); it reports its
    rank (plain aggregation) and its rank-slot indicator (``rank_slots``, secure aggregation).
    """
    from fedpeft.client.privacy import site_privacy
    from fedpeft.client.train import train_local
    from fedpeft.ranks import pad_to_rank, rank_indicator

    instructions = msg.content.config_records[K.CONFIG]
    round_number = int(instructions[K.CFG_ROUND])  # type: ignore[arg-type]
    trained_names = [str(n) for n in instructions[K.CFG_TRAIN_NAMES]]  # type: ignore[union-attr]
    global_flat = _global_flat(msg, site)
    privacy = None
    if site.config.privacy.enabled:
        run_id = ledger_run_id(msg)
        privacy = site_privacy(
            site.config,
            site.node_config,
            site_name=site.name,
            num_train=site.data.num_train,
            run_id=run_id,
        )
        privacy.charge(
            run_id=run_id,
            round_number=round_number,
            global_digest=hashlib.sha256(global_flat.tobytes()).hexdigest(),
        )
    result = train_local(
        site.loaded,
        site.data.train,
        global_flat=global_flat,
        trained_names=trained_names,
        config=site.config.train,
        device=site.device,
        # Under DP the sampling and noise seed comes from a secret only the site holds, so
        # the coordinator cannot replay them; it is stable per (federation, round) at the site.
        seed=(
            privacy.seed(run_id=run_id, round_number=round_number)
            if privacy is not None
            else site.config.seed * 1_000_003 + round_number * 7919 + zlib.crc32(site.name.encode())
        ),
        dp=privacy.dp if privacy is not None else None,
    )
    layout = site.global_layout.subset(lambda n: n in set(trained_names))
    metrics: dict[str, int | float] = {
        K.MET_NUM_EXAMPLES: result.num_examples,
        K.MET_TRAIN_LOSS: result.train_loss,
        K.MET_SECONDS: result.seconds,
    }
    if site.rank < site.config.lora.r:
        metrics[K.MET_LORA_RANK] = site.rank
    if privacy is not None:
        metrics.update(privacy.metrics())
    return LocalUpdate(
        delta=pad_to_rank(result.delta, layout, site.rank),
        layout=layout,
        metrics=metrics,
        rank_slots=rank_indicator(site.rank, site.config.lora.r),
    )


def handle_train(msg: Message, site: Site) -> RecordDict:
    """Train locally and return the delta of the tensors the server asked for."""
    update = local_update(msg, site)
    return RecordDict(
        {
            K.ARRAYS: ArrayRecord({K.ARRAY_FLAT: Array(update.delta)}),
            K.LAYOUT: ConfigRecord(
                {
                    K.LAYOUT_NAMES: list(update.layout.names),
                    K.LAYOUT_NUMELS: list(update.layout.numels),
                }
            ),
            K.METRICS: MetricRecord(dict(update.metrics)),
        }
    )


def handle_evaluate(msg: Message, site: Site) -> RecordDict:
    """Evaluate the global adapter on the site's held-out split.

    A site of rank ``r_i < lora.r`` evaluates the adapter's leading rank-``r_i`` block, the
    model it can run.
    """
    from fedpeft.client.train import evaluate_local

    result = evaluate_local(
        site.loaded,
        site.data.test,
        global_flat=_global_flat(msg, site),
        batch_size=site.config.train.eval_batch_size,
        device=site.device,
    )
    return RecordDict(
        {
            K.METRICS: MetricRecord(
                {
                    K.MET_NUM_EXAMPLES: result.num_examples,
                    K.MET_EVAL_LOSS: result.loss,
                    K.MET_EVAL_ACCURACY: result.accuracy,
                    K.MET_SECONDS: result.seconds,
                }
            )
        }
    )


def _answer(
    msg: Message,
    context: Context,
    config: FedPeftConfig | None,
    handler: Callable[[Message, Site], RecordDict],
) -> Message:
    try:
        from fedpeft.client.site import load_site

        resolved = config if config is not None else from_run_config(context.run_config)
        site = load_site(resolved, context.node_config)
        return Message(handler(msg, site), reply_to=msg)
    except Exception as err:  # a site's failure is a recorded error, not a crashed federation
        logger.exception("site failed to handle %s", msg.metadata.message_type)
        return Message(
            Error(
                code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}"
            ),
            reply_to=msg,
        )


def make_client_app(config: FedPeftConfig | None = None) -> ClientApp:
    """A ClientApp; with ``config`` it skips reading the run config (simulation)."""
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return _answer(msg, context, config, handle_train)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _answer(msg, context, config, handle_evaluate)

    # Secure aggregation (SecAgg+): four exchanges per round, "train.<action>" messages.
    @client_app.train(K.SECAGG_SETUP)
    def secagg_setup(msg: Message, context: Context) -> Message:
        return secure.answer_stage(msg, context, secure.handle_setup)

    @client_app.train(K.SECAGG_SHARE_KEYS)
    def secagg_share_keys(msg: Message, context: Context) -> Message:
        return secure.answer_stage(msg, context, secure.handle_share_keys)

    @client_app.train(K.SECAGG_MASKED)
    def secagg_masked(msg: Message, context: Context) -> Message:
        return _answer(
            msg,
            context,
            config,
            lambda m, site: secure.handle_masked(
                m,
                context,
                train=lambda: local_update(m, site),
                rank_slots=site.config.secagg.mixed_ranks,
            ),
        )

    @client_app.train(K.SECAGG_UNMASK)
    def secagg_unmask(msg: Message, context: Context) -> Message:
        return secure.answer_stage(msg, context, secure.handle_unmask)

    return client_app


app = make_client_app()
