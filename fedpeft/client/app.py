"""The fedpeft ClientApp: Flower's entry to a site, routing each message to its handler.

``app`` (the module attribute) is what Flower loads in a real deployment; it reads its
configuration from the run config. :func:`make_client_app` with a configuration is what
``fedpeft simulate`` hands to Flower's simulation engine; both run the same handlers.

What a site releases, and why nothing else leaves it, is :mod:`fedpeft.client.release`; the
SecAgg+ exchanges are :mod:`fedpeft.client.secure_aggregation`; a handler's refusal or
failure becomes an error reply in one mod (:func:`fedpeft.client.errors.error_reply_mod`).
Importing this module does not import torch or transformers (see
:mod:`fedpeft.client.release`): a deployed SuperNode starts a fresh process per message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpeft import constants as K
from fedpeft.client import secure_aggregation as secure
from fedpeft.client.errors import SiteRefusal, error_reply_mod
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


def _on_site(
    msg: Message,
    context: Context,
    config: FedPeftConfig | None,
    handler: Callable[[Message, Site], RecordDict],
    *,
    task: str,
) -> Message:
    """Run ``handler`` on the site's resources and reply with what it returns.

    ``task`` (train / evaluate) names what the instruction releases: its signature is
    checked, when the site trusts a coordinator key, before any resource is loaded.
    """
    from fedpeft.client.site import load_site

    resolved = config if config is not None else from_run_config(context.run_config)
    verify_instruction(msg, resolved, site_rules(context.node_config), task)
    site = load_site(resolved, context.node_config)
    return Message(handler(msg, site), reply_to=msg)


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
    and out; inside it, :func:`~fedpeft.client.errors.error_reply_mod` answers any refusal or
    failure of a handler with an error reply, which the trail records.
    """
    client_app = ClientApp(mods=[site_trail_mod(config), error_reply_mod])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        return _on_site(msg, context, config, handle_train, task=K.TASK_TRAIN)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _on_site(msg, context, config, handle_evaluate, task=K.TASK_EVALUATE)

    # Secure aggregation (SecAgg+): four exchanges per round, "train.<action>" messages.
    @client_app.train(K.SECAGG_SETUP)
    def secagg_setup(msg: Message, context: Context) -> Message:
        return Message(secure.handle_setup(msg, context), reply_to=msg)

    @client_app.train(K.SECAGG_SHARE_KEYS)
    def secagg_share_keys(msg: Message, context: Context) -> Message:
        return Message(secure.handle_share_keys(msg, context), reply_to=msg)

    @client_app.train(K.SECAGG_MASKED)
    def secagg_masked(msg: Message, context: Context) -> Message:
        task = masked_task(msg)
        work = local_update if task == K.TASK_TRAIN else secure_evaluation
        return _on_site(
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
        return Message(secure.handle_unmask(msg, context), reply_to=msg)

    return client_app


app = make_client_app()
