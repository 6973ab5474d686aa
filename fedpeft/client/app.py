"""The fedpeft ClientApp: Flower's entry to a site, routing each message to its handler.

``app`` (the module attribute) is what Flower loads in a real deployment; it reads its
configuration from the run config. :func:`make_client_app` with a configuration is what
``fedpeft simulate`` hands to Flower's simulation engine; both run the same handlers.

What a site releases, and why nothing else leaves it, is :mod:`fedpeft.client.release`; the
SecAgg+ exchanges are :mod:`fedpeft.client.secure_aggregation`. Importing this module does not
import torch or transformers (see :mod:`fedpeft.client.release`): a deployed SuperNode starts
a fresh process per message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpeft import constants as K
from fedpeft.client import secure_aggregation as secure
from fedpeft.client.errors import SiteRefusal, error_reply
from fedpeft.client.release import (
    handle_evaluate,
    handle_train,
    local_update,
    secure_evaluation,
    verify_instruction,
)
from fedpeft.client.rules import site_rules
from fedpeft.client.trail import site_trail_mod
from fedpeft.config import FedPeftConfig, from_run_config

if TYPE_CHECKING:  # imported where used: it imports torch
    from fedpeft.client.site import Site


def _answer(
    msg: Message,
    context: Context,
    config: FedPeftConfig | None,
    handler: Callable[[Message, Site], RecordDict],
    *,
    task: str | None,
) -> Message:
    """Run ``handler`` on the site's resources; a refusal or failure becomes an error reply.

    ``task`` (train / evaluate) names what the instruction releases: its signature is
    checked, when the site trusts a coordinator key, before any resource is loaded.
    """
    try:
        from fedpeft.client.site import load_site

        resolved = config if config is not None else from_run_config(context.run_config)
        if task is not None:
            verify_instruction(msg, resolved, site_rules(context.node_config), task)
        site = load_site(resolved, context.node_config)
        return Message(handler(msg, site), reply_to=msg)
    except Exception as err:  # a site's failure is a recorded error, not a crashed federation
        return error_reply(msg, err)


def masked_task(msg: Message) -> str:
    """What a secure round's masked stage asks for: a train update or an evaluation."""
    config = msg.content.config_records.get(K.CONFIG, ConfigRecord())
    task = config.get(K.CFG_TASK, K.TASK_TRAIN)
    if task not in (K.TASK_TRAIN, K.TASK_EVALUATE):
        raise SiteRefusal(K.ERR_BAD_INSTRUCTION, f"secure round asks for task {task!r}")
    return str(task)


def make_client_app(config: FedPeftConfig | None = None) -> ClientApp:
    """A ClientApp; with ``config`` it skips reading the run config (simulation).

    Every message passes the site's audit trail (:mod:`fedpeft.client.trail`) on its way in
    and out.
    """
    client_app = ClientApp(mods=[site_trail_mod(config)])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return _answer(msg, context, config, handle_train, task=K.TASK_TRAIN)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _answer(msg, context, config, handle_evaluate, task=K.TASK_EVALUATE)

    # Secure aggregation (SecAgg+): four exchanges per round, "train.<action>" messages.
    @client_app.train(K.SECAGG_SETUP)
    def secagg_setup(msg: Message, context: Context) -> Message:
        return secure.answer_stage(msg, context, secure.handle_setup)

    @client_app.train(K.SECAGG_SHARE_KEYS)
    def secagg_share_keys(msg: Message, context: Context) -> Message:
        return secure.answer_stage(msg, context, secure.handle_share_keys)

    @client_app.train(K.SECAGG_MASKED)
    def secagg_masked(msg: Message, context: Context) -> Message:
        try:
            task = masked_task(msg)
        except SiteRefusal as err:
            return error_reply(msg, err)
        work = local_update if task == K.TASK_TRAIN else secure_evaluation
        return _answer(
            msg,
            context,
            config,
            lambda m, site: secure.handle_masked(
                m,
                context,
                train=lambda session: work(m, site, session=session),
                rank_slots=task == K.TASK_TRAIN and site.config.secagg.mixed_ranks,
            ),
            task=task,
        )

    @client_app.train(K.SECAGG_UNMASK)
    def secagg_unmask(msg: Message, context: Context) -> Message:
        return secure.answer_stage(msg, context, secure.handle_unmask)

    return client_app


app = make_client_app()
