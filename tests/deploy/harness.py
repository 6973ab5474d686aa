"""A real fedpeft deployment on loopback: Flower's SuperLink and SuperNodes as processes.

Used by the deployment tests and ``benchmarks.deployment_latency``. It does what the
README's "Run a real federation" section tells a coordinator and its sites to do, with
ports picked free at run time and everything under one scratch folder:

- ``fedpeft certs`` / ``fedpeft keys`` (through :mod:`fedpeft.deploy`),
- ``flower-superlink`` with TLS and ``--enable-supernode-auth`` (or ``--insecure``),
- ``flwr supernode register`` for each site key,
- ``flower-supernode`` per site with its own node config (data file, ledger, device),
- ``flwr run`` with the fedpeft run config, then ``flwr ls`` until the run finished.

Every process is started in its own session and ended by its id in :meth:`close`, together
with the processes it started (Flower detaches its SuperExec and app processes into new
sessions, so their ids are collected from ``/proc`` before the parent is stopped).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.deploy import make_certificates, make_coordinator_key, make_site_keys
from fedpeft.testing import offline_env

ROOT = Path(__file__).resolve().parents[2]  # the Flower app: pyproject.toml is here
BIN = Path(sys.executable).parent
CONNECTION = "fedpeft-test"  # the SuperLink connection's name in $FLWR_HOME/config.toml
FINISHED = "finished:"


class DeploymentError(RuntimeError):
    """A process did not start, a command failed, or a run did not finish in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children() -> dict[int, list[int]]:
    """Parent pid → child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every process started, directly or not, by ``pid`` (still running)."""
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def stop_process(proc: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    """SIGTERM ``proc``, its process group and its descendants; SIGKILL what is left."""
    family = descendants(proc.pid)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # started with start_new_session=True
    for pid in family:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not any(Path(f"/proc/{p}").exists() for p in family):
            break
        time.sleep(0.2)
    for pid in [proc.pid, *family]:
        if Path(f"/proc/{pid}").exists():
            _signal(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@dataclass
class SiteFiles:
    """One site's own files: its data, its ledger, its key pair."""

    name: str
    data: Path
    ledger: Path
    private_key: Path
    public_key: Path


@dataclass
class LoopbackDeployment:
    """A SuperLink and its SuperNodes on 127.0.0.1, all files under ``root``.

    Parameters
    ----------
    root : Path
        Scratch folder for certificates, keys, logs, ``FLWR_HOME`` and run directories.
    secure : bool
        TLS (certificates from ``fedpeft certs``) and SuperNode authentication (keys from
        ``fedpeft keys``); ``False`` runs an ``--insecure`` SuperLink without authentication.
    env : dict
        Extra environment for every process (e.g. ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``).
    fast_polls : bool
        SuperNodes as ``fedpeft supernode --poll-interval 0.1`` (Flower's SuperNode with its
        fixed waits shortened) rather than Flower's ``flower-supernode``.
    """

    root: Path
    secure: bool = True
    env: dict[str, str] = field(default_factory=dict)
    fast_polls: bool = True
    port: int = 0
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    named: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = self.root / "flwr-home"
        self.home.mkdir(exist_ok=True)
        self.port = self.port or free_port()
        # The coordinator's signing key (README step 1): the ServerApp signs every instruction,
        # every site trusts only its public key.
        self.coordinator_key, self.coordinator_pub = make_coordinator_key(self.root / "coordinator")
        if self.secure:
            self.certs = make_certificates(self.root / "certs", hosts=["127.0.0.1", "localhost"])
        self.environ = offline_env(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec & co.
            FLWR_HOME=str(self.home),
            **self.env,
        )
        connection = [f"[superlink]\ndefault = {CONNECTION!r}\n", f"[superlink.{CONNECTION}]"]
        connection.append(f'address = "127.0.0.1:{self.port}"')
        if self.secure:
            connection.append(f'root-certificates = "{self.certs.ca_cert}"')
        else:
            connection.append("insecure = true")
        (self.home / "config.toml").write_text("\n".join(connection) + "\n", encoding="utf-8")

    # --- processes --------------------------------------------------------------------------
    def _start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        with log.open("wb") as handle:
            proc = subprocess.Popen(
                command,
                cwd=self.root,
                env=self.environ,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(proc)
        self.named[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL the process started as ``name`` and what it started: a crash, not a stop."""
        proc = self.named[name]
        for pid in [*descendants(proc.pid), proc.pid]:
            _signal(pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def flwr(self, *args: str, timeout: float = 120) -> dict[str, Any]:
        """``flwr ARGS --format json``; the parsed JSON answer."""
        command = [str(BIN / "flwr"), *args, "--format", "json"]
        done = subprocess.run(
            command, cwd=ROOT, env=self.environ, capture_output=True, timeout=timeout, check=False
        )
        text = done.stdout.decode(errors="replace")
        start = text.find("{")
        try:
            answer: dict[str, Any] = json.loads(text[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            answer = {}
        if done.returncode != 0 or not answer.get("success", False):
            raise DeploymentError(
                f"{shlex.join(command)} failed ({done.returncode}): {text[-2000:]}"
                f"{done.stderr.decode(errors='replace')[-2000:]}"
            )
        return answer

    def run_log(self, run_id: int) -> str:
        """What the run's ServerApp printed and logged (``flwr log RUN_ID --show``)."""
        command = [str(BIN / "flwr"), "log", str(run_id), CONNECTION, "--show"]
        done = subprocess.run(
            command, cwd=ROOT, env=self.environ, capture_output=True, timeout=120, check=False
        )
        return done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")

    def start_superlink(self, *, isolation: str = "subprocess") -> None:
        command = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--disable-runtime-dependency-installation", "--isolation", isolation]
        if self.secure:
            command += [
                "--ssl-ca-certfile",
                str(self.certs.ca_cert),
                "--ssl-certfile",
                str(self.certs.server_cert),
                "--ssl-keyfile",
                str(self.certs.server_key),
                "--enable-supernode-auth",
            ]
        else:
            command.append("--insecure")
        self._start("superlink", command)
        self._until(lambda: self._listening(), timeout=60, what="the SuperLink to listen")

    def _listening(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def make_sites(self, names: list[str], data: list[Path]) -> list[SiteFiles]:
        """Key pairs (registered with the SuperLink when secure) and ledger paths per site."""
        keys = make_site_keys(self.root / "keys", names)
        sites = []
        for key, csv in zip(keys, data, strict=True):
            if self.secure:
                self.flwr("supernode", "register", str(key.public_key), CONNECTION)
            ledger = self.root / "ledgers" / f"{key.name}.json"
            ledger.parent.mkdir(parents=True, exist_ok=True)  # the site operator's folder
            sites.append(SiteFiles(key.name, csv, ledger, key.private_key, key.public_key))
        return sites

    def start_supernode(
        self,
        name: str,
        *,
        node_config: str = "",
        private_key: Path | None = None,
        root_certificates: Path | None = None,
        insecure: bool = False,
        give_up_after: float | None = None,
        runtime_port: int | None = None,
        isolation: str = "subprocess",
    ) -> subprocess.Popen[bytes]:
        """``flower-supernode`` for one site; ``give_up_after`` bounds its connection retries.

        ``isolation="process"`` starts no executor: a ``fedpeft worker`` serves its tasks.
        """
        command = [str(BIN / "flower-supernode")]
        if self.fast_polls:
            command = [str(BIN / "fedpeft"), "supernode", "--poll-interval", "0.1", "--"]
        command += ["--superlink", f"127.0.0.1:{self.port}"]
        # its own runtime API (Flower's default 9094 would be shared by every site here)
        command += ["--port", str(runtime_port or free_port()), "--isolation", isolation]
        if insecure:
            command.append("--insecure")
        else:
            command += ["--root-certificates", str(root_certificates or self.certs.ca_cert)]
        if private_key is not None:
            command += ["--auth-supernode-private-key", str(private_key)]
        if node_config:
            command += ["--node-config", node_config]
        if give_up_after is not None:
            command += ["--max-retries", "3", "--max-wait-time", str(give_up_after)]
        return self._start(f"supernode-{name}", command)

    def start_site(
        self,
        site: SiteFiles,
        *,
        worker: bool = True,
        worker_command: list[str] | None = None,
        **node_settings: str | float,
    ) -> subprocess.Popen[bytes]:
        """A registered site's SuperNode, as the README shows it.

        With ``worker`` (the README's way) the SuperNode runs ``--isolation process`` and a
        ``fedpeft worker`` process serves its ClientApp tasks with the model kept loaded;
        without, Flower starts a fresh ClientApp process per message.
        """
        settings: dict[str, str | float] = {
            "data-path": str(site.data),
            "ledger-path": str(site.ledger),
            "coordinator-public-key": str(self.coordinator_pub),
            **node_settings,
        }
        node_config = " ".join(
            f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in settings.items()
        )
        runtime_port = free_port()
        node = self.start_supernode(
            site.name,
            node_config=node_config,
            private_key=site.private_key if self.secure else None,
            insecure=not self.secure,
            runtime_port=runtime_port,
            isolation="process" if worker else "subprocess",
        )
        if worker:
            self.start_worker(site.name, runtime_port, command=worker_command)
        return node

    def start_worker(
        self, name: str, runtime_port: int, *, command: list[str] | None = None
    ) -> subprocess.Popen[bytes]:
        """``fedpeft worker`` (or ``command`` + the address) for the SuperNode whose runtime
        API listens on ``runtime_port``."""
        address = f"127.0.0.1:{runtime_port}"
        if command is None:
            command = [str(BIN / "fedpeft"), "worker", "--runtime-api", address]
        else:
            command = [*command, address]
        return self._start(f"worker-{name}", command)

    def online_nodes(self) -> list[int]:
        answer = self.flwr("supernode", "ls", CONNECTION)
        return [int(n["node-id"]) for n in answer.get("nodes", []) if n.get("status") == "online"]

    def wait_online(self, count: int, *, timeout: float) -> list[int]:
        """Node ids once ``count`` SuperNodes are online.

        Every ``flwr`` call is a new Python process (seconds of CPU on a small machine), so
        the SuperNodes' logs are watched first and the SuperLink asked only then.
        """
        nodes: list[int] = []

        def activated() -> bool:
            logs = [p for n, p in self.logs.items() if n.startswith("supernode-")]
            return sum("SuperNode ID:" in p.read_text(errors="replace") for p in logs) >= count

        def enough() -> bool:
            nonlocal nodes
            nodes = self.online_nodes()
            return len(nodes) >= count

        started = time.monotonic()
        self._until(activated, timeout=timeout, what=f"{count} SuperNodes activated", poll=0.5)
        left = max(timeout - (time.monotonic() - started), 10.0)
        self._until(enough, timeout=left, what=f"{count} SuperNodes online", poll=2.0)
        return nodes

    # --- runs -------------------------------------------------------------------------------
    def submit(self, overrides: str, *, resume_from: str = "", signed: bool = True) -> int:
        """``flwr run`` the fedpeft app with these Hydra overrides; the run's id.

        ``signed`` names the coordinator's key in the run config (README step 5); without it
        the run is what anyone reaching the Control API could submit.
        """
        run_config = f"overrides={json.dumps(overrides)}"
        if signed:
            run_config += f" coordinator-key={json.dumps(str(self.coordinator_key))}"
        if resume_from:
            run_config += f" resume-from={json.dumps(resume_from)}"
        answer = self.flwr("run", str(ROOT), CONNECTION, "--run-config", run_config)
        return int(answer["run-id"])

    def run_status(self, run_id: int) -> dict[str, Any]:
        answer = self.flwr("ls", CONNECTION, "--run-id", str(run_id))
        runs: list[dict[str, Any]] = answer["runs"]
        return runs[0]

    def wait_run(
        self,
        run_id: int,
        *,
        timeout: float,
        ready: Callable[[], bool] | None = None,
        ask_every: float = 20.0,
    ) -> dict[str, Any]:
        """The run's ``flwr ls`` record once it finished (raises after ``timeout``).

        ``ready`` is a cheap local check (e.g. the run directory holds every round); the
        SuperLink is asked (``flwr ls``, a new process) when it holds or every ``ask_every`` s.
        """
        record: dict[str, Any] = {}
        last_ask = -math.inf

        def finished() -> bool:
            nonlocal record, last_ask
            now = time.monotonic()
            interval = 2.0 if ready is None or ready() else ask_every
            if now - last_ask < interval:
                return False
            last_ask = now
            record = self.run_status(run_id)
            return str(record["status"]).startswith(FINISHED)

        self._until(finished, timeout=timeout, what=f"run {run_id} to finish", poll=1.0)
        return record

    # --- helpers ----------------------------------------------------------------------------
    def _until(self, check: Any, *, timeout: float, what: str, poll: float = 0.3) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            dead = [p for p in self.processes[:1] if p.poll() is not None]
            if dead:
                raise DeploymentError(
                    f"the SuperLink exited while waiting for {what}\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"timed out after {timeout:.0f} s waiting for {what}\n{self.tail()}"
                )
            time.sleep(poll)

    def tail(self, lines: int = 30) -> str:
        """The last lines of every log, for a failure message."""
        parts = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            parts.append(f"--- {name} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)

    def close(self) -> None:
        """Stop every process this deployment started (SuperNodes first), by id."""
        for proc in reversed(self.processes):
            stop_process(proc)
        self.processes.clear()

    def __enter__(self) -> LoopbackDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
