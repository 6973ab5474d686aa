"""A long-lived ClientApp worker: one process per site that keeps torch and the model loaded.

In its default isolation mode Flower 1.41's SuperNode starts a fresh ``flwr-clientapp``
process for every message; each one re-imports torch, transformers, peft and Opacus and
reloads the base model (about 10 s on two cores, before any training), and a round is two
to five messages. Flower has no long-lived ClientApp process: ``flwr-clientapp`` serves one
task token and exits, and its warm executors exist only for Kubernetes agent apps.

This module is that missing worker. A site starts its SuperNode with ``--isolation process``
(which starts no executor of its own) and then ``fedpeft worker``, which polls the
SuperNode's runtime API for ClientApp tasks and runs each one in this process, so the
imports happen once and :func:`fedpeft.model.cached_model` keeps the base model across
messages, rounds and runs.

What it takes from Flower (pinned ``flwr==1.41.0``): the runtime HTTP client and its
``AcquireTask`` call (as ``flwr.supercore.superexec.run_superexec`` uses it), and the
task-input / reply / task-output exchange of ``flwr.supernode.runtime.run_clientapp``. These
are internals: an upgrade of Flower must re-run ``tests/deploy``.

What it does differently, on purpose:

- It never installs or imports code from the app bundle (FAB) the coordinator shipped. It
  runs the fedpeft ClientApp installed at the site, and only for a run whose bundle names
  that same ClientApp (:data:`CLIENTAPP_REF`); any other run's task gets an error reply.
  A site thus runs code it installed and reviewed, not code that arrived over the network.
- A failing task becomes an error reply and a failed task status; the worker goes on with
  the next task. A task Flower cancels (its heartbeat is refused) is abandoned, not fatal.
- It checks the site's own node config (data file, ledger, ε ceiling, δ; see
  :func:`fedpeft.preflight.check_node_config`) before it serves: at start when given the
  SuperNode's ``--node-config`` (``fedpeft worker --node-config``), and in any case at the
  first task, because the runtime API hands a worker the node config only with a task. A
  bad node config is answered with an error reply and stops the worker (``ConfigError``,
  exit 2) with the same message: it cannot get better until its operator fixes it.
- There is no process isolation between tasks: run the worker under a supervisor (systemd,
  a container restart policy) so that a crash is followed by a restart.
"""

from __future__ import annotations

import logging
import threading
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.config import get_fab_config
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedpeft import constants as K
from fedpeft.config import ConfigError, FedPeftConfig

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run

__all__ = ["CLIENTAPP_REF", "Worker", "WorkerStats", "check_bundle", "pull_task_input"]

logger = logging.getLogger(__name__)

#: The ClientApp a run's bundle must name (``[tool.flwr.app.components] clientapp``).
CLIENTAPP_REF = "fedpeft.client.app:app"
#: Seconds between task polls when idle: one small loopback HTTP request each. Flower's own
#: executor polls every 1 s by default (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``).
POLL_INTERVAL_S = 0.05
#: First retry, in seconds, of an object the SuperNode announced but has not stored yet (it
#: lists a task as soon as the message arrives, before the message's arrays do). Flower's
#: ``flwr-clientapp`` waits 1 s here, more than a whole training step of a small adapter.
OBJECT_RETRY_S = 0.02
#: Seconds between task heartbeats while a task runs (Flower's own sender beats every 30 s).
HEARTBEAT_INTERVAL_S = 15.0


@dataclass
class WorkerStats:
    """What a worker did: tasks completed and failed, seconds spent serving them, errors."""

    completed: int = 0
    failed: int = 0
    task_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def check_bundle(run: Run, fab: Fab) -> None:
    """Raise PermissionError unless the run's bundle names :data:`CLIENTAPP_REF`.

    Only the name is read (``pyproject.toml`` inside the bundle); no code of the bundle is
    installed or imported.
    """
    try:
        config = get_fab_config(fab.content)
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as err:
        named = f"<unreadable bundle: {err}>"
    else:
        components = config.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
        named = str(components.get("clientapp", "<none>"))
    if named != CLIENTAPP_REF:
        raise PermissionError(
            f"run {run.run_id} ({run.fab_id} {run.fab_version}) names the ClientApp "
            f"{named!r}; this fedpeft worker runs only {CLIENTAPP_REF!r}, the app installed "
            "at this site. Submit the fedpeft app, or serve this run with Flower's own "
            "executor (flower-supernode --isolation subprocess)"
        )


class Worker:
    """Serve the ClientApp tasks of one SuperNode, in this process.

    Parameters
    ----------
    runtime_api_address : str
        The SuperNode's runtime API, ``HOST:PORT`` (``flower-supernode --port``; Flower's
        default is ``127.0.0.1:9094``). Keep it on loopback: the API is plain HTTP.
    poll_interval : float, default POLL_INTERVAL_S (0.05)
        Seconds between task polls while idle.
    load_app : callable, optional
        Returns the ClientApp to run; default imports :data:`CLIENTAPP_REF` once.
    node_config : mapping, optional
        The SuperNode's ``--node-config``, checked by :meth:`serve` before the first poll
        (with the columns of ``config``, by default fedpeft's defaults).
    config : FedPeftConfig, optional
        The runs this site expects, for the start-up check of its data's columns.
    """

    def __init__(
        self,
        runtime_api_address: str,
        *,
        poll_interval: float = POLL_INTERVAL_S,
        load_app: Callable[[], ClientApp] | None = None,
        node_config: Mapping[str, object] | None = None,
        config: FedPeftConfig | None = None,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval={poll_interval!r} must be > 0 seconds, e.g. 0.05")
        self.address = runtime_api_address
        self.poll_interval = poll_interval
        self._load_app = load_app or _load_fedpeft_app
        self._app: ClientApp | None = None
        self.stats = WorkerStats()
        self.stop_event = threading.Event()
        self.node_config = dict(node_config) if node_config is not None else None
        self.config = config
        self._checked: set[str] = set()  # node configs that passed check_node_config
        self.refusal: ConfigError | None = None  # why the worker stopped serving
        self._tasks = self._client()

    def _client(self, token: str | None = None) -> RuntimeHttpClient:
        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )

    @property
    def app(self) -> ClientApp:
        if self._app is None:
            self._app = self._load_app()
        return self._app

    # --- the loop ---------------------------------------------------------------------------
    def serve(self, *, max_tasks: int | None = None) -> WorkerStats:
        """Run tasks until :attr:`stop_event` is set (or ``max_tasks`` have been served)."""
        from fedpeft.preflight import check_node_config

        if self.node_config is not None:
            try:
                check_node_config(self.node_config, self.config)
            except ConfigError:
                self._tasks.close()
                raise
            self._checked.add(repr(sorted(self.node_config.items())))
        logger.info("fedpeft worker serving ClientApp tasks of the SuperNode at %s", self.address)
        try:
            while not self.stop_event.is_set():
                if max_tasks is not None and self.stats.completed + self.stats.failed >= max_tasks:
                    break
                try:
                    busy = self.poll_once()
                except Exception as err:  # the SuperNode restarting, a refused poll: retry
                    logger.warning("task poll failed (%s); retrying", err)
                    busy = False
                if not busy:
                    self.stop_event.wait(self.poll_interval)
        finally:
            self._tasks.close()
        if self.refusal is not None:
            raise self.refusal
        return self.stats

    def check_task_node(self, node_config: Mapping[str, object]) -> None:
        """At a deployed node's first task: its node config (columns are the run's to check)."""
        from fedpeft.preflight import check_node_config

        key = repr(sorted((str(k), str(v)) for k, v in node_config.items()))
        if K.NODE_PARTITION_ID in node_config or key in self._checked:
            return  # a simulation partition, or checked already
        check_node_config(node_config, columns=False)
        self._checked.add(key)

    def poll_once(self) -> bool:
        """Acquire and run one pending ClientApp task; False when none was pending."""
        response = self._tasks.AcquireTask(
            AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        )
        if not (response.HasField("task") and response.token):
            return False
        self.run_task(response.token)
        return True

    def run_task(self, token: str) -> None:
        """One task: pull its message, run the ClientApp, push the reply and the task status."""
        client = self._client(token)
        cancelled, done = threading.Event(), threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(client, done, cancelled), daemon=True)
        beat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        started = pulled = ran = time.perf_counter()
        try:
            message, context, run, fab = pull_task_input(client)
            pulled = time.perf_counter()
            check_bundle(run, fab)
            self.check_task_node(context.node_config)
            reply = self.app(message=message, context=context)
            ran = time.perf_counter()
            status, details = SubStatus.COMPLETED, ""
        except ConfigError as err:  # the node config: refuse this task and stop serving
            logger.error("refusing to serve: %s", err)
            self.refusal = err
            self.stop_event.set()
            details = f"site-config: {err}"
            self.stats.errors.append(details)
            if message is not None:
                number, text = K.SITE_ERRORS[K.ERR_SITE_CONFIG]
                reply = Message(
                    Error(code=number, reason=f"{K.ERR_SITE_CONFIG}: {text}"), reply_to=message
                )
        except Exception as err:  # a task's failure is reported, the worker goes on
            reason = f"{type(err).__name__}: {err}"
            logger.exception("ClientApp task failed: %s", reason)
            details = reason
            self.stats.errors.append(reason)
            if message is not None:
                code = (
                    ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                    if isinstance(err, PermissionError | ImportError)
                    else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
                )
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None and not cancelled.is_set():
                    push_message(client, reply, context)
            except Exception as err:  # the SuperNode went away: the task is lost, not the worker
                logger.exception("could not push the reply: %s", err)
                status, details = SubStatus.FAILED, f"reply not delivered: {err}"
            try:
                push_task_output(client, context, status, details)
            except Exception as err:  # e.g. the run was stopped meanwhile (HTTP 403)
                logger.warning("could not report the task's status: %s", err)
            done.set()
            client.close()
            end = time.perf_counter()
            self.stats.task_seconds += end - started
            if status == SubStatus.COMPLETED:
                logger.info(
                    "round %s %s task: %.3f s (pull %.3f, app %.3f, push %.3f)",
                    message.metadata.group_id if message else "?",
                    message.metadata.message_type if message else "?",
                    end - started,
                    pulled - started,
                    ran - pulled,
                    end - ran,
                )
            if status == SubStatus.COMPLETED:
                self.stats.completed += 1
            else:
                self.stats.failed += 1


def _heartbeat(
    client: RuntimeHttpClient, done: threading.Event, cancelled: threading.Event
) -> None:
    """Beat for the running task until ``done``; a refused beat means Flower cancelled it."""
    while not done.is_set():  # the first beat at once, as Flower's own sender does
        try:
            if not client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                logger.warning("the SuperNode cancelled the running task")
                cancelled.set()
                return
        except Exception as err:  # a missed beat is retried at the next interval
            if not done.is_set():
                logger.warning("task heartbeat failed: %s", err)
        done.wait(HEARTBEAT_INTERVAL_S)


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
    """The task's message, context, run and bundle (``run_clientapp.pull_task_input``).

    The same calls as Flower's, with :data:`OBJECT_RETRY_S` as the first retry of an object
    that is not stored yet instead of Flower's fixed 1 s (``PULL_INITIAL_BACKOFF``).
    """
    task = client.PullTaskInput(PullTaskInputRequest())
    context = context_from_proto(task.context)
    run = run_from_proto(task.run)
    fab = fab_from_proto(task.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode's runtime API returned a task without a message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        initial_backoff=OBJECT_RETRY_S,
        backoff_cap=0.1,
    )
    # The deflated message does not carry its own id (its object id), as in Flower's copy.
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


def _load_fedpeft_app() -> ClientApp:
    from fedpeft.client.app import app

    return app
