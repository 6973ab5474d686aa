"""Sending a batch of messages and collecting the replies with a short poll.

Flower 1.41's deployed ``Grid`` (``flwr/superlink/grid/http_grid.py``) sleeps a fixed 3 s
between pulls in ``send_and_receive``, so every exchange waits on average 1.5 s after the last
reply arrived; a secure round makes five exchanges (four SecAgg+ stages and evaluation). This
module pushes and pulls through the public ``Grid`` API instead, polling every
:data:`POLL_INTERVAL_S`. :class:`PollingGrid` wraps any grid with that ``send_and_receive``, so
the round loop and both aggregations keep calling ``grid.send_and_receive`` and need not know
whether they run deployed, simulated or in a test.

A reply can be listed before its arrays are stored at the SuperLink (a SuperNode sends the
message, then its objects); the deployed grid then retries the object pull after a fixed
1 s, doubling (``flwr.supercore.inflatable.inflatable_utils.PULL_INITIAL_BACKOFF``, bound as
a default argument). :class:`PollingGrid` rebinds the grid module's ``pull_objects`` with a
first retry of :data:`OBJECT_RETRY_S` (:func:`shorten_object_retry`): a Flower internal,
applied only where the module has that name, and only in the ServerApp's own process.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # the type Grid.get_nodes returns
from flwr.serverapp import Grid
from flwr.supercore.run import Run

__all__ = ["OBJECT_RETRY_S", "POLL_INTERVAL_S", "PollingGrid", "exchange", "shorten_object_retry"]

#: Seconds between pulls: the interval of Flower's own in-memory (simulation) grid. One pull
#: is one small HTTP request to the SuperLink; the wait after the last reply averages half this.
POLL_INTERVAL_S = 0.1
#: First retry, in seconds, of a reply's object that is listed but not stored yet.
OBJECT_RETRY_S = 0.02


def shorten_object_retry(grid: Grid) -> bool:
    """Rebind ``pull_objects`` in ``grid``'s module with a first retry of OBJECT_RETRY_S.

    Returns whether the module had a ``pull_objects`` to rebind (the deployed grid does; the
    simulation's and the tests' grids hold replies in memory and do not).
    """
    module = sys.modules.get(type(grid).__module__)
    pull = getattr(module, "pull_objects", None)
    if module is None or pull is None:
        return False
    if not isinstance(pull, functools.partial):
        module.pull_objects = functools.partial(  # type: ignore[attr-defined]
            pull, initial_backoff=OBJECT_RETRY_S, backoff_cap=0.2
        )
    return True


#: Told of an exchange's progress: ``watch(message_type, replied=…, asked=…)``.
Watch = Callable[..., None]


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float | None,
    poll_interval: float = POLL_INTERVAL_S,
    watch: Watch | None = None,
) -> list[Message]:
    """Push ``messages``, then pull replies until all arrived or ``timeout`` seconds passed.

    Parameters
    ----------
    grid : Grid
        Any Flower grid.
    messages : iterable of Message
        One message per destination node.
    timeout : float or None
        Seconds to wait for replies after pushing; None waits until every reply arrived.
    poll_interval : float, default POLL_INTERVAL_S (0.1)
        Seconds between pulls.
    watch : callable, optional
        Called as ``watch(message_type, replied=k, asked=n)`` once the messages are pushed
        and whenever more replies arrived (a live progress display).

    Returns
    -------
    list of Message
        The replies that arrived in time, in arrival order. A message the SuperLink refused
        (its id comes back empty) gets no reply, like a site that never answers.
    """
    if poll_interval <= 0:
        raise ValueError(f"poll_interval={poll_interval!r} must be > 0 seconds, e.g. 0.2")
    batch = list(messages)
    pending = {str(i) for i in grid.push_messages(batch) if i}
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    kind, asked = (batch[0].metadata.message_type if batch else ""), len(pending)
    if watch is not None:
        watch(kind, replied=0, asked=asked)
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending.difference_update(r.metadata.reply_to_message_id for r in arrived)
        if arrived and watch is not None:
            watch(kind, replied=asked - len(pending), asked=asked)
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll_interval)
    return replies


class PollingGrid(Grid):
    """``grid`` with :func:`exchange` as its ``send_and_receive``; everything else delegated."""

    def __init__(
        self, grid: Grid, *, poll_interval: float = POLL_INTERVAL_S, watch: Watch | None = None
    ) -> None:
        self.grid = grid
        self.poll_interval = poll_interval
        self.watch = watch
        shorten_object_retry(grid)

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return exchange(
            self.grid, messages, timeout=timeout, poll_interval=self.poll_interval, watch=self.watch
        )
