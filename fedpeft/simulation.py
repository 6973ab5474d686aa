"""A whole federation on one machine, through the simulation path Flower 1.41 documents.

``flwr.simulation.run_simulation`` is deprecated in Flower 1.41 ("use ``flwr run`` in the
CLI instead"); the current path is ``flwr run APP CONNECTION`` against a SuperLink started
with ``--simulation``. That SuperLink starts ``flwr-simulation``, which loads the app's
ServerApp and ClientApp from the FAB that ``flwr run`` built and plays the sites on Flower's
Ray backend (``flwr/cli/local_superlink.py``, ``flwr/simulation/app.py``). This module does
exactly that, with what a simulation run needs around it:

- a SuperLink of its own (:class:`SuperLink`): loopback only, free ports, in-memory state,
  a private ``FLWR_HOME`` removed afterwards, started and ended by its process id, so a
  run never meets another one's SuperLink or ``~/.flwr``;
- the composed configuration travels whole, as YAML in the run config key ``config``
  (:data:`fedpeft.constants.RUN_CONFIG`), so the ServerApp and every ClientApp see exactly
  the object that :func:`~fedpeft.preflight.preflight` checked;
- the federation's size and resources go in Flower's federation config (``num-supernodes``
  is ``federation.num_sites``: :func:`federation_config`); a ``federation.ray_address``
  reaches Ray as ``RAY_ADDRESS`` (Flower's simulation config has no address field, and
  ``ray.init`` reads that variable);
- everything the processes print (Flower, Ray actors, transformers, warnings) goes to
  ``RUN_DIR/log.txt``, each line timestamped (:class:`RunLog`), and the console shows
  fedpeft's own lines, rendered from ``RUN_DIR/events.jsonl`` (:mod:`fedpeft.console`).

``flwr run .`` from the repository root runs the same app on Flower's managed local
SuperLink (``[tool.flwr.federations]`` in ``pyproject.toml``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from fedpeft import constants as K
from fedpeft.config import ConfigError, FedPeftConfig, to_yaml
from fedpeft.preflight import preflight
from fedpeft.server.rounds import RoundRecord
from fedpeft.server.rundir import ABORTED_FILE, EVENTS_FILE, LOG_FILE, RunDir, default_run_dir

#: Environment of every Flower process fedpeft starts: no telemetry, no update check, no
#: runtime installs (a FAB's ``uv sync`` would download CUDA torch), Ray on loopback.
RUNTIME_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's node IP: 127.0.0.1, not the LAN's
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "PYTHONUNBUFFERED": "1",  # lines reach log.txt as they are printed
}
for _name, _value in RUNTIME_ENV.items():  # this process imports Flower and Ray too
    os.environ.setdefault(_name, _value)

#: fedpeft's source tree, whose ``pyproject.toml`` declares the Flower app ``[tool.flwr.app]``.
APP_DIR = Path(__file__).resolve().parents[1]
#: Name of the SuperLink connection in the private ``FLWR_HOME/config.toml``.
CONNECTION = "fedpeft-simulation"
#: Seconds to wait for the SuperLink's HTTP API to answer after it was started.
SUPERLINK_START_S = 60.0


@dataclass(frozen=True)
class SimulationResult:
    """Where a simulated federation wrote its files, and its per-round figures."""

    run_dir: Path
    records: list[RoundRecord]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The lines of ``metrics.jsonl`` as written (:meth:`RoundRecord.as_json`)."""
        return [record.as_json() for record in self.records]


def runtime_env(**extra: str) -> dict[str, str]:
    """This process's environment with :data:`RUNTIME_ENV` (and ``extra``) for a child.

    The folder of this Python's scripts leads ``PATH``: the SuperLink starts Flower's
    ``flower-superexec`` and ``flwr-simulation`` by name.
    """
    env = dict(os.environ)
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")]) if env.get("PATH") else scripts
    env.update(RUNTIME_ENV)
    env.update(extra)
    return env


def federation_config(config: FedPeftConfig) -> dict[str, int | float | str | bool]:
    """Flower's federation config for this simulation (``flwr run --federation-config``).

    ``num-supernodes`` is ``federation.num_sites``: one SuperNode per data partition. With
    ``federation.ray_address`` the cluster's own resources apply, so no ``init-args-num-cpus``
    is passed (Ray refuses it when it joins an existing cluster).
    """
    fed = config.federation
    cores = os.cpu_count() or 1
    cpus = int(fed.client_cpus) if fed.client_cpus > 0 else cores
    values: dict[str, int | float | str | bool] = {
        "num-supernodes": fed.num_sites,
        "client-resources-num-cpus": cpus,
        "client-resources-num-gpus": float(fed.client_gpus),
        "init-args-logging-level": "error",
        "init-args-log-to-driver": True,  # actors' output reaches the run's log
    }
    if fed.ray_address is None:
        values["init-args-num-cpus"] = cores
    return values


def simulation_config(config: FedPeftConfig, run_dir: Path) -> FedPeftConfig:
    """``config`` with what only a simulation decides: run dir, ledgers, threads per site."""
    train, privacy = config.train, config.privacy
    if train.num_threads == 0 and config.federation.client_cpus > 0:
        # Several sites share the cores: give each its own share of threads, not all of them.
        train = replace(train, num_threads=max(1, int(config.federation.client_cpus)))
    if privacy.enabled and not privacy.ledger_dir:
        # The virtual sites' ledgers live with the run (a real site names its own file).
        privacy = replace(privacy, ledger_dir=str((run_dir / "ledgers").resolve()))
    return replace(config, train=train, privacy=privacy, output_dir=str(run_dir.resolve()))


def write_flower_app(folder: Path) -> Path:
    """A Flower app folder holding only ``pyproject.toml``: fedpeft's app, imported installed.

    Its ``[project]`` and ``[tool.flwr.app]`` (components, run config keys) are those of
    fedpeft's own ``pyproject.toml``; it ships no code, so the FAB ``flwr run`` builds is a
    few hundred bytes and the run imports the fedpeft this process imports. (Built from the
    source tree, the FAB would hold every file of the checkout that git does not ignore, and
    collecting them walks the virtual environment too: about 5 s per run here.)
    """
    import tomllib

    source = APP_DIR / "pyproject.toml"
    try:
        declared = tomllib.loads(source.read_text(encoding="utf-8"))
        project, app = declared["project"], declared["tool"]["flwr"]["app"]
        components, run_config = app["components"], app["config"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(
            f"fedpeft simulate runs the Flower app declared in {source} ([tool.flwr.app]), "
            f"which could not be read ({type(err).__name__}: {err}); install fedpeft from its "
            "source tree (`make setup`, or `pip install -e .` in the repository)"
        ) from None

    def table(name: str, values: Mapping[str, Any]) -> str:
        body = "".join(f"{json.dumps(k)} = {json.dumps(v)}\n" for k, v in values.items())
        return f"[{name}]\n{body}\n"

    keep = ("name", "version", "description", "license", "dependencies")
    text = table("project", {k: project[k] for k in keep if k in project})
    text += table("tool.flwr.app", {"publisher": app["publisher"]})
    text += table("tool.flwr.app.components", components)
    text += table("tool.flwr.app.config", run_config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(text, encoding="utf-8")
    return folder


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RunLog:
    """``RUN_DIR/log.txt``: every line any process of the run printed, timestamped.

    Lines are appended (a resumed run continues its log) and, with ``echo``, shown on the
    console as well (``fedpeft simulate -v``).
    """

    def __init__(self, path: Path, *, echo: IO[str] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.echo = echo
        self._handle = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, source: str, line: str) -> None:
        """Append ``line`` (each of its ``\\r``-separated redraws, e.g. a progress bar's)."""
        text = _ANSI.sub("", line)  # colour codes: the text stays, the escapes go
        stamp = datetime.now().isoformat(sep=" ", timespec="milliseconds")
        parts = [part for part in text.split("\r") if part] or [""]
        with self._lock:
            for part in parts:
                self._handle.write(f"{stamp} [{source}] {part}\n")
            self._handle.flush()
            if self.echo is not None:
                print(line, file=self.echo, flush=True)

    def pump(self, source: str, stream: IO[bytes]) -> threading.Thread:
        """Copy ``stream`` line by line into the log in a thread, until it closes."""

        def copy() -> None:
            for raw in iter(stream.readline, b""):
                self.write(source, raw.decode("utf-8", errors="replace").rstrip("\r\n"))
            stream.close()

        thread = threading.Thread(target=copy, name=f"log-{source}", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        with self._lock:
            self._handle.close()


def free_loopback_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    """``name`` beside this Python (the environment fedpeft runs in), else on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        raise ConfigError(
            f"Flower's {name!r} command is not installed beside {sys.executable} nor on PATH; "
            "install flwr[simulation] into this environment (`make setup`)"
        )
    return found


class SuperLink:
    """A Flower SuperLink in simulation mode, this run's own (loopback, in-memory).

    Its ``FLWR_HOME`` (the CLI's connection config, the installed FAB) is a fresh temporary
    folder; the process and its children (``flwr-simulation``, Ray) are one process group,
    ended by that group's id in :meth:`stop`.
    """

    def __init__(self, log: RunLog, env: Mapping[str, str]) -> None:
        self.log = log
        self.home = Path(tempfile.mkdtemp(prefix="fedpeft-flwr-"))
        self.port = free_loopback_port()
        self.env = {**env, "FLWR_HOME": str(self.home)}
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n',
            encoding="utf-8",
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._pumps: list[threading.Thread] = []

    def start(self) -> None:
        command = [
            _bin("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self.log.write("fedpeft", "starting: " + " ".join(command))
        self.process = subprocess.Popen(
            command,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, ended by its id in stop()
        )
        assert self.process.stdout is not None
        self._pumps.append(self.log.pump("superlink", self.process.stdout))
        deadline = time.monotonic() + SUPERLINK_START_S
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Flower's SuperLink exited with code {self.process.returncode} before it "
                    f"answered on 127.0.0.1:{self.port}; see {self.log.path}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Flower's SuperLink did not answer on 127.0.0.1:{self.port} within "
                    f"{SUPERLINK_START_S:.0f} s; see {self.log.path}"
                )
            time.sleep(0.1)

    def _answers(self) -> bool:
        import httpx

        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=0.5).is_success
        except httpx.HTTPError:
            return False

    def submit(self, config: FedPeftConfig) -> subprocess.Popen[bytes]:
        """``flwr run`` the app with ``config`` (whole, as YAML); streams the run's log."""
        run_config = self.home / "run-config.toml"
        # A JSON string is a TOML basic string: the YAML travels verbatim.
        run_config.write_text(f"{K.RUN_CONFIG} = {json.dumps(to_yaml(config))}\n", "utf-8")
        federation = " ".join(
            f"{key}={json.dumps(value)}" for key, value in federation_config(config).items()
        )
        command = [
            _bin("flwr"),
            "run",
            str(write_flower_app(self.home / "app")),
            CONNECTION,
            "--federation-config",
            federation,
            "--run-config",
            str(run_config),
            "--stream",
        ]
        self.log.write("fedpeft", "submitting: " + " ".join(command))
        process = subprocess.Popen(
            command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert process.stdout is not None
        self._pumps.append(self.log.pump("flwr run", process.stdout))
        return process

    def stop(self) -> None:
        """SIGTERM to the SuperLink's process group, SIGKILL to what is left after 20 s."""
        if self.process is not None:
            for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break  # the whole group is gone
                try:
                    self.process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for pump in self._pumps:
            pump.join(timeout=10)
        shutil.rmtree(self.home, ignore_errors=True)


@contextmanager
def superlink(log: RunLog, env: Mapping[str, str]) -> Iterator[SuperLink]:
    """A started :class:`SuperLink`, stopped on the way out whatever happened."""
    link = SuperLink(log, env)
    try:
        link.start()
        yield link
    finally:
        link.stop()


def simulation_env(config: FedPeftConfig) -> dict[str, str]:
    """The environment of the run's processes (``RAY_ADDRESS`` for a Ray cluster)."""
    extra = {}
    if config.federation.ray_address is not None:
        extra["RAY_ADDRESS"] = str(config.federation.ray_address)
    env = runtime_env(**extra)
    if config.federation.ray_address is None:
        env.pop("RAY_ADDRESS", None)  # a private Ray, whatever this shell points at
    return env


_ERROR_LINE = re.compile(r"^\s*([\w.]+(?:Error|Exception|Aborted)): (.+)$")


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__()
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(self.format(record))


@contextmanager
def transformers_log(into: list[str]) -> Iterator[None]:
    """transformers' log records of this block (a model's load report), kept in ``into`` for
    log.txt instead of printed on the console; its own handler is back afterwards."""
    from transformers.utils import logging as hf_logging

    handler = _Collect(into)
    hf_logging.disable_default_handler()
    hf_logging.add_handler(handler)
    try:
        yield
    finally:
        hf_logging.remove_handler(handler)
        hf_logging.enable_default_handler()


def last_error(log_path: Path) -> str | None:
    """The last ``SomeError: message`` line of a log (a ServerApp's exception), if any."""
    found = None
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        text = line.split("] ", 1)[-1]  # after RunLog's "<time> [source] "
        match = _ERROR_LINE.match(text)
        if match:
            found = f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"
    return found


def simulate(
    config: FedPeftConfig,
    *,
    run_dir: str | Path | None = None,
    console: Any = None,
    check: bool = True,
    verbose: bool = False,
) -> SimulationResult:
    """Run ``config`` as a local federation of ``federation.num_sites`` virtual sites.

    Everything the sites will need is checked first (:func:`fedpeft.preflight.preflight`):
    a bad input raises one :class:`~fedpeft.config.ConfigError` before any process starts.
    Pass ``check=False`` only for a configuration that has just passed it (a multirun checks
    every job before the first starts, :mod:`fedpeft.multirun`).

    ``console`` (a :class:`fedpeft.console.Console`; default one on stderr) shows the run's
    progress; with ``verbose`` everything the run's processes print is shown as well as
    written to ``RUN_DIR/log.txt``.

    Raises
    ------
    ConfigError
        Every problem :func:`~fedpeft.preflight.preflight` found (nothing was started).
    FederationAborted
        When the federation ended early because no site could train (its reason).
    RuntimeError
        When the ServerApp stopped before the last round (its error, from the log).
    """
    from fedpeft.console import Console
    from fedpeft.server.federation import FederationAborted

    out = Path(run_dir) if run_dir is not None else default_run_dir(config)
    config = simulation_config(config, out)
    # What the libraries warn while this process checks the inputs goes to log.txt with
    # the rest (recorded here, in this call only: no process-wide filter is changed).
    failed: BaseException | None = None
    advice: list[str] = []  # what fedpeft.plan says of the DP noise at these sites
    logged: list[str] = []  # what transformers logs while the plan builds the model
    quiet = transformers_log(logged) if check else nullcontext()
    with warnings.catch_warnings(record=True) as warned, quiet:
        warnings.simplefilter("default")  # Python's own: each warning once per location
        try:
            if check:  # before a process, the run directory or a model is touched
                report = preflight(config)
                if config.privacy.enabled:
                    from fedpeft.plan import simulation_plans, warnings_for

                    advice = warnings_for(simulation_plans(config, report))
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the warnings
            failed = err
    if failed is not None:
        for w in warned:  # no log to move them to: shown as Python would have shown them
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        for text in logged:
            print(text, file=sys.stderr)
        raise failed
    shown = console if console is not None else Console()
    events = out / EVENTS_FILE
    offset = events.stat().st_size if events.exists() else 0
    log = RunLog(out / LOG_FILE, echo=sys.stderr if verbose else None)
    for w in warned:
        text = warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
        for line in text.rstrip("\n").splitlines():
            log.write("fedpeft", line)
    for text in logged:
        for line in text.splitlines():
            log.write("fedpeft", line)
    try:
        shown.notices(config, log_dir=out)
        for line in advice:
            shown.line(f"fedpeft: warning: {line}")
        with superlink(log, simulation_env(config)) as link:
            run = link.submit(config)
            offset = shown.follow(events, offset, running=lambda: run.poll() is None)
            run.wait()
            shown.follow(events, offset, running=lambda: False)  # what came last
    finally:
        log.close()
        shown.close()
    aborted = out / ABORTED_FILE
    if aborted.is_file():
        raise FederationAborted(str(json.loads(aborted.read_text())["reason"]))
    records = RunDir(out).read_rounds()
    if len(records) < config.federation.rounds:
        error = last_error(out / LOG_FILE) or f"flwr run exited with code {run.returncode}"
        raise RuntimeError(
            f"simulation ended after {len(records)} of {config.federation.rounds} round(s): "
            f"{error} (the whole log: {out / LOG_FILE})"
        )
    return SimulationResult(run_dir=out, records=records)
