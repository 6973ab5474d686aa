"""A whole federation on one machine through Flower's simulation engine.

The ServerApp and ClientApp are the same ones a real deployment runs
(:mod:`fedpeft.server.app`, :mod:`fedpeft.client.app`); here they are handed the
composed configuration directly instead of reading it from Flower's run config, and
Flower's Ray backend plays the sites. Ray is kept on the loopback interface.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedpeft.config import FedPeftConfig
from fedpeft.preflight import preflight
from fedpeft.server.progress import Progress
from fedpeft.server.rundir import default_run_dir

# Flower reads these at import time: no telemetry, no update check, no runtime installs.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@dataclass(frozen=True)
class SimulationResult:
    """Where a simulated federation wrote its files, and its per-round figures."""

    run_dir: Path
    rows: list[dict[str, Any]]


def backend_config(config: FedPeftConfig) -> dict[str, Any]:
    """Flower's Ray backend settings: resources per site, loopback only, no dashboard.

    With ``federation.ray_address`` the backend joins that cluster (``ray.init(address=…)``)
    instead of starting a private Ray: the cluster's own resources, network and dashboard
    apply, so nothing about cores, interface or dashboard is passed (Ray refuses them when
    it connects to an existing cluster).
    """
    cores = os.cpu_count() or 1
    fed = config.federation
    cpus = fed.client_cpus if fed.client_cpus > 0 else float(cores)
    logging = {"logging_level": "error", "log_to_driver": True}
    if fed.ray_address is not None:
        init_args: dict[str, Any] = {"address": fed.ray_address, **logging}
    else:
        init_args = {
            "num_cpus": cores,
            "include_dashboard": False,
            "_node_ip_address": "127.0.0.1",
            **logging,
        }
    return {
        "client_resources": {"num_cpus": cpus, "num_gpus": fed.client_gpus},
        "init_args": init_args,
    }


def simulation_config(config: FedPeftConfig, run_dir: Path) -> FedPeftConfig:
    """``config`` with what only a simulation decides: ledgers and threads per site."""
    train, privacy = config.train, config.privacy
    if train.num_threads == 0 and config.federation.client_cpus > 0:
        # Several sites share the cores: give each its own share of threads, not all of them.
        train = replace(train, num_threads=max(1, int(config.federation.client_cpus)))
    if privacy.enabled and not privacy.ledger_dir:
        # The virtual sites' ledgers live with the run (a real site names its own file).
        privacy = replace(privacy, ledger_dir=str((run_dir / "ledgers").resolve()))
    return replace(config, train=train, privacy=privacy)


def simulate(
    config: FedPeftConfig,
    *,
    run_dir: str | Path | None = None,
    progress: Progress | None = None,
    check: bool = True,
) -> SimulationResult:
    """Run ``config`` as a local federation of ``federation.num_sites`` virtual sites.

    Everything the sites will need is checked first (:func:`fedpeft.preflight.preflight`):
    a bad input raises one :class:`~fedpeft.config.ConfigError` before Ray starts. Pass
    ``check=False`` only for a configuration that has just passed it (a multirun checks
    every job before the first starts, :mod:`fedpeft.multirun`).

    Raises
    ------
    ConfigError
        Every problem :func:`~fedpeft.preflight.preflight` found (nothing was started).
    FederationAborted
        When the federation ended early because no site could train (its reason).
    """
    out = Path(run_dir) if run_dir is not None else default_run_dir(config)
    config = simulation_config(config, out)
    if check:  # before Ray, the run directory or a model is touched
        preflight(config)

    from flwr.simulation import run_simulation

    from fedpeft.client.app import make_client_app
    from fedpeft.server.app import make_server_app
    from fedpeft.server.rundir import RunDir

    run_simulation(
        server_app=make_server_app(config, run_dir=out, progress=progress),
        client_app=make_client_app(config),
        num_supernodes=config.federation.num_sites,
        backend_config=backend_config(config),  # type: ignore[arg-type]
    )
    rows = RunDir(out).read_metrics()
    if len(rows) < config.federation.rounds:
        raise RuntimeError(
            f"simulation ended after {len(rows)} of {config.federation.rounds} round(s); "
            "see the log above for the ServerApp's error"
        )
    return SimulationResult(run_dir=out, rows=rows)
