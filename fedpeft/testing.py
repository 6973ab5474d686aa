"""An in-process Flower ``Grid`` for fast, deterministic federations in one process.

It delivers each message to a ClientApp called in this process with the node's own
Context (node config, persistent state), so tests can give every site its own files,
make a site fail, tamper with a reply, or drop it — without starting Ray or servers —
and benchmarks can run many small federations quickly. Flower's simulation engine
(:mod:`fedpeft.simulation`) covers the real engine; this covers the server's decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["InProcessGrid", "Tamper"]

Tamper = Callable[[int, Message], Message | None]


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs.
    node_configs : dict[int, dict]
        Node id → that site's node config.
    run_config : dict
        The run config every node sees.
    tamper : callable, optional
        ``tamper(node_id, reply)`` may return a modified reply, or None to drop it.
    """

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: dict[int, dict[str, Any]],
        run_config: dict[str, Any] | None = None,
        tamper: Tamper | None = None,
        run_id: int = 1,
    ) -> None:
        self.client_app = client_app
        # What Flower's own in-memory grid sets before a ServerApp creates messages.
        TaskIdentity.run_id = run_id
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.contexts = {
            node: Context(
                run_id=run_id,
                node_id=node,
                node_config=dict(cfg),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for node, cfg in node_configs.items()
        }
        self.tamper = tamper
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self._pending: dict[str, Message] = {}

    def set_run(self, run: Any) -> None:  # pragma: no cover - not used in-process
        raise NotImplementedError("InProcessGrid has no Run")

    @property
    def run(self) -> Any:  # pragma: no cover - not used in-process
        raise NotImplementedError("InProcessGrid has no Run")

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content=content,
            dst_node_id=dst_node_id,
            message_type=message_type,
            group_id=group_id,
            ttl=ttl,
        )

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for i, msg in enumerate(messages):
            key = f"{len(self.sent)}-{i}"
            self.sent.append(msg)
            self._pending[key] = msg
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for key in message_ids:
            msg = self._pending.pop(key)
            node = msg.metadata.dst_node_id
            reply = self.client_app(msg, self.contexts[node])
            self.received.append(reply)
            if self.tamper is not None:
                reply = self.tamper(node, reply)
            if reply is not None:
                replies.append(reply)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
