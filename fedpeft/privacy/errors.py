"""Exceptions raised by ``fedpeft.privacy``.

This module owns the error types of the differential-privacy core, so that callers (the
client's training loop, the CLI) can tell a bad privacy setting, an exhausted budget, a damaged
ledger and a model Opacus cannot handle apart, and turn each into a clear error reply. Every
message names the value at fault, what is allowed and how to fix it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "BudgetExceededError",
    "DPCompatibilityError",
    "EvaluationRefusedError",
    "LedgerError",
    "NonFiniteExamplesError",
    "PrivacyConfigError",
    "PrivacyError",
    "ReleaseMismatchError",
]


class PrivacyError(Exception):
    """Base class of every error raised by ``fedpeft.privacy``."""


class PrivacyConfigError(PrivacyError, ValueError):
    """A privacy setting is invalid or its target cannot be reached.

    Raised before any training starts, e.g. for ``epsilon <= 0``, ``delta`` outside ``(0, 1)``,
    a sampling rate outside ``(0, 1]`` or an ε target that no sane noise multiplier reaches.
    """


class BudgetExceededError(PrivacyError):
    """Spending more privacy budget would exceed the site's ε ceiling.

    The message states the ε already spent, the ε after the refused work and the ceiling.
    Nothing is recorded in the ledger when this is raised.
    """


class LedgerError(PrivacyError):
    """The privacy ledger file is unreadable, corrupted or inconsistent with a new record.

    A ledger is never reset silently: that would let a site overspend its budget.
    """


class DPCompatibilityError(PrivacyError):
    """The model, optimizer or data loader cannot be trained with DP-SGD as given.

    The message lists every problem found at once (as Opacus' ``ModuleValidator`` does).
    """


class ReleaseMismatchError(PrivacyError):
    """A retried release came out different from the one already charged and sent.

    A retry with identical inputs reuses the same randomness; if its result differs (a
    nondeterministic kernel, another machine), sending it would let the receiver subtract the
    two and cancel the shared noise. The site refuses instead.
    """


class EvaluationRefusedError(PrivacyError):
    """An evaluation the site does not owe: a round it was not charged for, or a second,
    different adapter for a round it already evaluated."""


class NonFiniteExamplesError(PrivacyError):
    """Ghost clipping met examples whose loss or gradient norm is not finite.

    Ghost clipping's second backward pass runs through every example's activations, so such
    an example cannot be left out of the clipped sum; :meth:`fedpeft.privacy.dp.DPSession.
    backward` undoes the step and raises this instead. Run the forward pass again on the
    examples in ``finite`` (``(B,)`` bool) and call ``backward`` with their losses, as
    :func:`fedpeft.client.train.private_backward` does: each example is dropped or kept by
    its own value alone, which changes the clipped sum as its absence would. The error is
    for the training loop and never leaves the site (which examples failed is private).
    """

    def __init__(self, finite: torch.Tensor) -> None:
        self.finite = finite
        super().__init__(
            "ghost clipping cannot leave examples with a non-finite loss or gradient norm out "
            "of the clipped sum; run the forward pass again on batch[error.finite] "
            "(fedpeft.client.train.private_backward does)"
        )
