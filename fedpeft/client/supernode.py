"""Flower's own SuperNode, with its fixed waits shortened: ``fedpeft supernode``.

Flower 1.41's SuperNode (``flwr/supernode/start_client_internal.py``) waits on constants
that no flag or setting changes: 3 s after every empty fetch from the SuperLink, 0.5 s
between checks for the ClientApp's reply and for its objects, and 1 s doubling to 10 s
before retrying an object the SuperLink has announced but not yet stored. Every message of
a round pays the first one (1.5 s on average), and a fast reply can pay the last. With the
model kept loaded by :mod:`fedpeft.client.worker`, these waits are most of a deployed round.

:func:`run` starts Flower's ``flower-supernode`` entry point in this process, unchanged,
after swapping two names in that one module: its ``time`` (so that its sleeps last at most
``poll_interval``) and its ``pull_objects`` (a shorter first retry). Everything else —
arguments, TLS, node authentication, the runtime API, the node config — is Flower's. A
shorter wait costs one small request to the SuperLink per interval while idle (0.1 s: ten
per second per site; Flower's own ServerApp-side in-memory grid polls as often).

This leans on Flower's internals (pinned ``flwr==1.41.0``); :func:`run` checks that the
names it swaps exist and fails with a clear message if an upgrade moved them.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

__all__ = ["POLL_INTERVAL_S", "ShortSleeps", "run", "shorten_waits"]

#: Longest wait, in seconds, of the patched SuperNode loop.
POLL_INTERVAL_S = 0.1


class ShortSleeps:
    """The ``time`` module, with every ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def shorten_waits(module: ModuleType, poll_interval: float = POLL_INTERVAL_S) -> None:
    """Cap the fixed waits of Flower's SuperNode loop ``module`` at ``poll_interval`` s."""
    if not 0 < poll_interval <= 3:
        raise ValueError(
            f"poll_interval={poll_interval!r} must be in (0, 3] seconds (Flower's own wait "
            "is 3 s), e.g. 0.1"
        )
    missing = [n for n in ("time", "pull_objects") if not hasattr(module, n)]
    if missing:
        raise RuntimeError(
            f"{module.__name__} has no {missing}: this Flower release "
            "changed the SuperNode loop; run Flower's own flower-supernode instead"
        )
    module.time = ShortSleeps(poll_interval)  # type: ignore[attr-defined]
    original = getattr(module.pull_objects, "func", module.pull_objects)
    module.pull_objects = functools.partial(  # type: ignore[attr-defined]
        original, initial_backoff=poll_interval / 2, backoff_cap=2 * poll_interval
    )


def run(argv: Sequence[str], *, poll_interval: float = POLL_INTERVAL_S) -> None:
    """``flower-supernode ARGV`` in this process, with waits of at most ``poll_interval``."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    shorten_waits(start_client_internal, poll_interval)
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
