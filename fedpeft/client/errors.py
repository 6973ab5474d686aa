"""What a site says when it refuses or fails: a code and a fixed message, nothing more.

An error reply leaves the site, so it must not carry data-dependent text (how many losses
were not finite, a file's columns, a ledger's spent ε). Every exception a handler raises is
logged here in full, in the site's own log, and answered with one of the fixed codes of
:data:`fedpeft.constants.SITE_ERRORS`; the server records the code. This is the one place
that turns an exception into an error reply: for every handler of the ClientApp, one Flower
mod (:func:`error_reply_mod`), as Flower's own mods wrap a handler
(``flwr/clientapp/mod/centraldp_mods.py``); the site's audit trail
(:mod:`fedpeft.client.trail`) calls :func:`error_reply` for its own failures.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from fedpeft import constants as K
from fedpeft.config import ConfigError
from fedpeft.privacy.errors import (
    BudgetExceededError,
    EvaluationRefusedError,
    PrivacyConfigError,
    ReleaseMismatchError,
)
from fedpeft.privacy.secagg import SecAggError
from fedpeft.privacy.signing import SignatureError

__all__ = ["SiteRefusal", "error_code", "error_reply", "error_reply_mod"]

logger = logging.getLogger(__name__)


class SiteRefusal(Exception):
    """The site refuses an instruction for a reason its node config states.

    Parameters
    ----------
    code : str
        One of the names in :data:`fedpeft.constants.SITE_ERRORS`.
    detail : str
        What the site's operator reads in its log (never sent).
    """

    def __init__(self, code: str, detail: str) -> None:
        if code not in K.SITE_ERRORS:
            raise ValueError(f"unknown site error code {code!r}")
        super().__init__(detail)
        self.code = code


_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (BudgetExceededError, K.ERR_BUDGET),
    (ReleaseMismatchError, K.ERR_RELEASE_MISMATCH),
    (EvaluationRefusedError, K.ERR_EVALUATION_REFUSED),
    (SignatureError, K.ERR_SIGNATURE),
    (SecAggError, K.ERR_PROTOCOL),
    (ConfigError, K.ERR_SITE_CONFIG),
    (PrivacyConfigError, K.ERR_SITE_CONFIG),
)


def error_code(error: BaseException) -> str:
    """The code an exception is answered with."""
    if isinstance(error, SiteRefusal):
        return error.code
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return K.ERR_SITE_FAILED


def error_reply(msg: Message, error: BaseException) -> Message:
    """Log ``error`` in full at the site; reply with its code and fixed message only."""
    code = error_code(error)
    logger.error(
        "site refused or failed to handle %s (round %s): %s: %s",
        msg.metadata.message_type,
        msg.metadata.group_id,
        code,
        error,
    )
    # One line above (a simulation prints it per site per round); the traceback only where
    # the log keeps DEBUG (``fedpeft worker`` does for this logger), not on a console.
    if code in (K.ERR_SITE_FAILED, K.ERR_BAD_INSTRUCTION):
        logger.debug("traceback of the %s above", code, exc_info=error)
    number, text = K.SITE_ERRORS[code]
    return Message(Error(code=number, reason=f"{code}: {text}"), reply_to=msg)


def error_reply_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The Flower mod that answers any exception of the handler it wraps with :func:`error_reply`.

    A refusal (:class:`SiteRefusal`) and a failure alike become the fixed error reply of
    their code, so a site's failure is a recorded error, not a crashed federation.
    """
    try:
        return call_next(msg, context)
    except Exception as err:  # a site's failure is a recorded error, not a crashed federation
        return error_reply(msg, err)
