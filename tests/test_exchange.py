"""The server's short-poll exchange, and a ClientApp that starts without torch."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.server.exchange import PollingGrid, exchange


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a ServerApp process has set before it creates messages.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


class SlowGrid(Grid):
    """Node n answers at the n-th pull; ``silent`` nodes never do; ``refused`` are not accepted."""

    def __init__(self, *, silent: Iterable[int] = (), refused: Iterable[int] = ()) -> None:
        self.silent, self.refused = set(silent), set(refused)
        self.pulls = 0
        self.pending: dict[str, Message] = {}
        self.pull_times: list[float] = []

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2, 3]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for i, msg in enumerate(messages):
            node = msg.metadata.dst_node_id
            key = "" if node in self.refused else f"m{i}"
            msg.metadata.__dict__["_message_id"] = key
            if key:
                self.pending[key] = msg
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        self.pull_times.append(time.monotonic())
        replies = []
        for key in list(message_ids):
            msg = self.pending[key]
            node = msg.metadata.dst_node_id
            if node not in self.silent and self.pulls >= node:
                replies.append(
                    Message(RecordDict({"r": ConfigRecord({"node": node})}), reply_to=msg)
                )
                del self.pending[key]
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Any:
        raise AssertionError("the slow 3-second path must not be used")


def _messages(nodes: Iterable[int]) -> list[Message]:
    return [
        Message(RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train")
        for n in nodes
    ]


def _nodes(replies: Iterable[Message]) -> list[int]:
    return sorted(int(r.content.config_records["r"]["node"]) for r in replies)  # type: ignore[call-overload]


def test_exchange_polls_until_every_reply_arrived() -> None:
    grid = SlowGrid()
    start = time.monotonic()
    replies = exchange(grid, _messages([1, 2, 3]), timeout=10, poll_interval=0.05)
    assert _nodes(replies) == [1, 2, 3]
    assert grid.pulls == 3  # stops as soon as the last reply is in
    assert time.monotonic() - start < 2.0
    gaps = [b - a for a, b in zip(grid.pull_times, grid.pull_times[1:], strict=False)]
    assert all(gap >= 0.04 for gap in gaps)


def test_exchange_gives_up_at_the_timeout_and_skips_refused_messages() -> None:
    grid = SlowGrid(silent={2}, refused={3})
    start = time.monotonic()
    replies = exchange(grid, _messages([1, 2, 3]), timeout=0.3, poll_interval=0.05)
    elapsed = time.monotonic() - start
    assert _nodes(replies) == [1]
    assert 0.3 <= elapsed < 1.5


def test_polling_grid_uses_the_short_poll_and_delegates() -> None:
    inner = SlowGrid()
    grid = PollingGrid(inner, poll_interval=0.01)
    assert list(grid.get_node_ids()) == [1, 2, 3]
    assert _nodes(grid.send_and_receive(_messages([1, 2]), timeout=5)) == [1, 2]
    with pytest.raises(ValueError, match="poll_interval=0"):
        exchange(inner, _messages([1]), timeout=1, poll_interval=0)


def test_client_app_module_loads_without_torch() -> None:
    # A deployed SuperNode starts a fresh process per message: the SecAgg+ key stages must not
    # pay for importing torch, transformers, peft and Opacus.
    code = (
        "import sys, fedpeft.client.app\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'opacus') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
