"""``federation.ray_address``: a simulation on an existing Ray cluster instead of a private Ray.

The slow test starts a real Ray head on 127.0.0.1 (``ray start --head --block`` in its own
process group, ended by that group's id), runs ``fedpeft simulate`` through it and checks
that the run's driver and its virtual sites ran in that cluster (their logs are in the
head's own temporary folder, named by the driver's pid), that the run directory holds
every round, and that the cluster outlives the run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedpeft.config import ConfigError, compose_config
from fedpeft.preflight import preflight
from fedpeft.simulation import federation_config, simulation_env
from fedpeft.testing import offline_env
from tests.deploy.harness import free_port

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "address",
    ["ray://10.0.0.5:10001", "10.0.0.5", "10.0.0.5:0", "10.0.0.5:65536", ":6379", "auto:x"]
    + ["::1:6379", "[]:6379", "[::1:6379"],  # IPv6 only in brackets, as Ray parses it
)
def test_a_malformed_ray_address_is_refused_with_what_is_allowed(address: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose_config(["federation.client_cpus=1", f"federation.ray_address='{address}'"])
    assert f"federation.ray_address={address!r}" in str(err.value)
    assert "HOST:PORT" in str(err.value) and "'auto'" in str(err.value)


def test_a_bracketed_ipv6_head_is_accepted() -> None:
    config = compose_config(
        ["federation.client_cpus=1", "privacy.enabled=false", "federation.ray_address='[::1]:6379'"]
    )
    assert config.federation.ray_address == "[::1]:6379"


def test_paths_on_a_cluster_must_be_absolute(tmp_path: Path) -> None:
    cluster = ["federation.ray_address=auto", "federation.client_cpus=1", "privacy.enabled=true"]
    for relative in ("privacy.ledger_dir=ledgers", "data.path=data/all.csv", "model.path=m"):
        others = [f"privacy.ledger_dir={tmp_path}"] if "ledger" not in relative else []
        with pytest.raises(ConfigError, match="node's working folder; give absolute paths"):
            compose_config([*cluster, *others, relative])


def test_a_cluster_needs_cores_per_site() -> None:
    with pytest.raises(ConfigError, match=r"federation.client_cpus=0.0: on a cluster"):
        compose_config(["federation.ray_address=auto"])


def test_a_private_simulation_on_a_cluster_names_a_shared_ledger_folder(tmp_path: Path) -> None:
    cluster = ["federation.ray_address=auto", "federation.client_cpus=1", "privacy.enabled=true"]
    with pytest.raises(ConfigError, match=r"needs privacy.ledger_dir=PATH on a filesystem"):
        compose_config(cluster)
    config = compose_config([*cluster, f"privacy.ledger_dir={tmp_path}"])
    assert config.privacy.ledger_dir == str(tmp_path)


def test_the_backend_joins_the_cluster_and_passes_no_local_resources() -> None:
    private = compose_config([])
    assert federation_config(private)["init-args-num-cpus"] == (os.cpu_count() or 1)
    assert "RAY_ADDRESS" not in simulation_env(private)

    joined = compose_config(
        [
            "federation.ray_address=127.0.0.1:6379",
            "federation.client_cpus=2",
            "privacy.enabled=false",
        ]
    )
    # Ray refuses num_cpus, resources, ... when it connects to an existing cluster; Flower's
    # simulation config has no address field, and ray.init reads RAY_ADDRESS
    assert federation_config(joined) == {
        "num-supernodes": 5,
        "client-resources-num-cpus": 2,
        "client-resources-num-gpus": 0.0,
        "init-args-logging-level": "error",
        "init-args-log-to-driver": True,
    }
    assert simulation_env(joined)["RAY_ADDRESS"] == "127.0.0.1:6379"


def test_a_shell_pointing_at_a_cluster_does_not_move_a_private_simulation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert "RAY_ADDRESS" not in simulation_env(compose_config([]))


def test_no_head_at_the_address_is_found_before_ray_starts(cls_csv: Path) -> None:
    port = free_port()  # nothing listens there
    config = compose_config(
        [
            "experiment=tiny_classification",
            f"data.path={cls_csv}",
            f"federation.ray_address=127.0.0.1:{port}",
            "federation.client_cpus=1",
        ]
    )
    with pytest.raises(ConfigError, match=rf"ray_address='127.0.0.1:{port}': no Ray head"):
        preflight(config)


def _until(check: object, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


def _answers(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_a_simulation_runs_on_an_existing_ray_cluster(cls_csv: Path, tmp_path: Path) -> None:
    port = free_port()
    # the head's own folder, where its logs land; short, for Ray's Unix socket paths there
    temp = Path(tempfile.mkdtemp(prefix="fedpeft-ray-", dir="/tmp"))
    log = (tmp_path / "head.log").open("wb")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}"]
        + ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false"]
        + ["--disable-usage-stats", f"--temp-dir={temp}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=offline_env(),
        start_new_session=True,  # its own process group: ended below by that group's id
    )
    try:
        try:
            _until(lambda: _answers(port), timeout=120, what="the Ray head to listen")
        except TimeoutError:
            raise AssertionError((tmp_path / "head.log").read_text(errors="replace")) from None
        run_dir = tmp_path / "run"
        command = [str(BIN / "fedpeft"), "simulate", "experiment=tiny_classification"]
        command += [f"data.path={cls_csv}", f"output_dir={run_dir}", "train.num_threads=1"]
        command += [f"federation.ray_address=127.0.0.1:{port}", "federation.client_cpus=1"]
        driver = subprocess.Popen(
            command, env=offline_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            output, _ = driver.communicate(timeout=600)
        finally:
            if driver.poll() is None:
                driver.kill()  # by its pid; its Ray connection ends with it
                driver.wait(timeout=60)
        assert driver.returncode == 0, output.decode(errors="replace")[-4000:]
        assert "Local node IP: 127.0.0.1" in (tmp_path / "head.log").read_text()  # loopback

        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1, 2]
        assert all(r["sites_replied"] == 3 and r["sites_failed"] == 0 for r in rows)
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

        # the run's driver (Flower's flwr-simulation process) and its sites ran in the head's
        # cluster: a driver that connects leaves its log in the head's folder
        logs = temp / "session_latest" / "logs"
        assert list(logs.glob("python-core-driver-*.log")), sorted(logs.iterdir())
        actor_logs = [p for p in logs.glob("worker-*.err") if "ClientAppActor" in p.read_text()]
        assert actor_logs, "no virtual site ran on the cluster"
        assert head.poll() is None and _answers(port)  # the cluster outlives the run
    finally:
        _end_group(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _end_group(head: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the head's process group (``ray start --block`` ends its Ray processes),
    SIGKILL to whatever of that group is left after a minute."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return  # the whole group is gone
        try:
            head.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(2)  # its children end after it
