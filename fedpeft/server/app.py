"""The fedpeft ServerApp: Flower's entry on the coordinator.

It reads the run config (the configuration, ``resume-from``, ``coordinator-key``, the
declared transport), checks a simulation's size, and hands the round loop
(:mod:`fedpeft.server.federation`) a :class:`~fedpeft.server.exchange.PollingGrid`. ``app``
is what Flower loads (``pyproject.toml``: ``serverapp``); :func:`make_server_app` with a
configuration skips reading the run config.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft import constants as K
from fedpeft.config import ConfigError, FedPeftConfig, as_dict, read_run_config
from fedpeft.privacy.signing import load_private_key
from fedpeft.server.exchange import PollingGrid
from fedpeft.server.federation import run_federation
from fedpeft.server.progress import Progress
from fedpeft.server.rundir import default_run_dir

logger = logging.getLogger(__name__)

SIZE_WAIT_S = 120.0  # longest wait for a simulation's SuperNodes to come online
SIZE_SETTLE_S = 5.0  # a count unchanged this long is all the simulation started


SIMULATED_TRANSPORT = {
    "tls": "not applicable: a simulation passes messages inside one machine",
    "node_auth": "not applicable: a simulation's sites are its own processes",
}


def declared_transport(run_config: Mapping[str, Any]) -> dict[str, str]:
    """TLS and SuperNode authentication as the coordinator declares them in the run config.

    The ServerApp cannot see how the SuperLink was started, so the report says these are
    declared (run config ``transport-tls`` / ``transport-node-auth``), not observed.
    """
    found = {}
    for key, name in ((K.RUN_TRANSPORT_TLS, "tls"), (K.RUN_TRANSPORT_NODE_AUTH, "node_auth")):
        value = str(run_config.get(key, "") or "").strip()
        found[name] = (
            f"{value} (declared by the coordinator; the ServerApp cannot observe the SuperLink)"
            if value
            else f"not declared (run config {key}); check the SuperLink's command line"
        )
    return found


def check_simulated_size(grid: Grid, config: FedPeftConfig) -> None:
    """In Flower's simulation, the SuperNodes it started must be ``federation.num_sites``.

    ``federation.num_sites`` is the one setting of the federation's size: it splits the data
    into that many partitions, and ``fedpeft simulate`` starts that many SuperNodes. ``flwr
    run .`` starts as many as its federation config says (``--federation-config
    num-supernodes=N``, Flower's default 2); a difference would leave partitions untrained
    (or sites without a partition), so it is an error naming both. A deployment's sites
    connect when they choose and are not counted here (``federation.min_sites`` applies).

    Raises
    ------
    ConfigError
        When the simulation's SuperNode count differs from ``federation.num_sites``.
    """
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if not isinstance(grid, InMemoryGrid):
        return
    wanted = config.federation.num_sites
    # The simulated SuperNodes come online as the backend starts (Ray: seconds): wait until
    # all are there, more than asked, or the count has stood still for SIZE_SETTLE_S.
    started, since = -1, time.monotonic()
    deadline = since + SIZE_WAIT_S
    while True:
        count = len(list(grid.get_node_ids()))
        now = time.monotonic()
        if count != started:
            started, since = count, now
        if started >= wanted or (started > 0 and now - since > SIZE_SETTLE_S) or now > deadline:
            break
        time.sleep(0.1)
    if started != wanted:
        raise ConfigError(
            f"Flower's simulation started {started} SuperNode(s) (options.num-supernodes) but "
            f"federation.num_sites={wanted}: each of the {wanted} data partitions needs one "
            "site. Make them agree: `flwr run . --federation-config num-supernodes="
            f"{wanted}` (or `flwr federation simulation-config --num-supernodes {wanted}`), "
            f"or run config overrides='federation.num_sites={started}' — or use `fedpeft "
            "simulate`, which starts federation.num_sites sites."
        )


def make_server_app(
    config: FedPeftConfig | None = None,
    *,
    run_dir: str | Path | None = None,
    progress: Progress | None = None,
    signing_key: Ed25519PrivateKey | None = None,
) -> ServerApp:
    """A ServerApp; with ``config`` it skips reading the run config (simulation).

    ``signing_key`` (or, read from the run config, the file named by ``coordinator-key``)
    signs every train and evaluate instruction.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        resume_from = None
        key = signing_key
        transport = SIMULATED_TRANSPORT
        if config is not None:
            resolved = config
        else:
            transport = declared_transport(context.run_config)
            settings = read_run_config(context.run_config)
            resolved, resume_from = settings.config, settings.resume_from
            key_path = str(context.run_config.get(K.RUN_COORDINATOR_KEY, "") or "").strip()
            if key_path:
                key = load_private_key(Path(key_path).expanduser())
        if resume_from is not None:
            out = Path(resume_from)
        else:
            out = Path(run_dir) if run_dir is not None else default_run_dir(resolved)
        logger.info("fedpeft config: %s", as_dict(resolved))
        check_simulated_size(grid, resolved)
        shown = progress or Progress()
        # Flower's deployed grid waits 3 s between pulls; PollingGrid polls every 0.1 s.
        run_federation(
            PollingGrid(grid, watch=shown.exchange),
            resolved,
            run_dir=out,
            progress=shown,
            resume=bool(resume_from),
            signing_key=key,
            transport=transport,
        )

    return server_app


app = make_server_app()
