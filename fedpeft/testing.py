"""Helpers for tests and benchmarks: an in-process ``Grid``, synthetic data, a child's environment.

:class:`InProcessGrid` runs fast, deterministic federations in one process.

It delivers each message to a ClientApp called in this process with the node's own
Context (node config, persistent state), so tests can give every site its own files,
make a site fail, tamper with a reply, or drop it — without starting Ray or servers —
and benchmarks can run many small federations quickly. Flower's simulation engine
(:mod:`fedpeft.simulation`) covers the real engine; this covers the server's decisions.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

if TYPE_CHECKING:
    from fedpeft.server.rounds import RoundRecord

__all__ = [
    "InProcessGrid",
    "Tamper",
    "offline_env",
    "round_record",
    "write_causal_jsonl",
    "write_classification_csv",
]

POSITIVE = ["good", "great", "fine", "superb", "lovely", "bright"]
NEGATIVE = ["bad", "awful", "poor", "dull", "ugly", "grim"]
FILLER = ["the", "a", "movie", "plot", "was", "and"]


def write_classification_csv(path: Path, n: int = 240, seed: int = 0) -> Path:
    """An easy sentiment task (``text,label,domain``): the label is which word list the text
    draws from; ``domain`` cycles d0, d1, d2 for a natural split by column."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "domain"])
        for i in range(n):
            label = rng.randint(0, 1)
            words = rng.choices(POSITIVE if label else NEGATIVE, k=3) + rng.choices(FILLER, k=3)
            rng.shuffle(words)
            writer.writerow([" ".join(words), label, f"d{i % 3}"])
    return path


def write_causal_jsonl(path: Path, n: int = 120, seed: int = 0) -> Path:
    """Prompt/response pairs (JSONL): the response repeats the prompt's first word."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(n):
            words = rng.choices(POSITIVE + NEGATIVE, k=3)
            handle.write(
                json.dumps({"prompt": "say " + " ".join(words), "response": words[0]}) + "\n"
            )
    return path


def round_record(**fields: Any) -> RoundRecord:
    """A plausible finished round of 3 sites (no DP, plain aggregation), with ``fields``
    changed: for tests of what reads rounds (display, report) without running one."""
    from fedpeft.server.rounds import RoundRecord

    values: dict[str, Any] = {
        "round": 1,
        "rounds": 3,
        "sites_sampled": 3,
        "sites_replied": 3,
        "sites_failed": 0,
        "sites_dropped": 0,
        "failures": {},
        "updated": True,
        "train_loss": 0.5,
        "bytes_down": 1000,
        "bytes_up": 2000,
        "site_metrics": {},
        "secagg": False,
        "secagg_params": {},
        "eval_loss": 0.4,
        "eval_accuracy": 0.75,
        "eval_sites": 3,
        "eval_bytes_down": 1000,
        "phase_seconds": {},
        "epsilon": {},
        "epsilon_max": None,
        "seconds": 1.0,
        "adapter_sha256": "0" * 64,
    }
    return RoundRecord(**{**values, **fields})


def offline_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child process: offline, no telemetry, Ray on loopback.

    Flower's and Ray's settings are :data:`fedpeft.simulation.RUNTIME_ENV`. Warnings are
    left on: a child's stderr goes to its log, where they belong.
    """
    from fedpeft.simulation import runtime_env

    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return runtime_env(**{**offline, **extra})


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
            answered = self.client_app(msg, self.contexts[node])
            self.received.append(answered)
            reply = answered if self.tamper is None else self.tamper(node, answered)
            if reply is not None:
                replies.append(reply)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
