"""A real deployment on loopback: SuperLink with TLS and SuperNode authentication, three sites.

Each site is a ``flower-supernode`` process with its own CSV file and privacy ledger; the
coordinator submits with ``flwr run``. See :mod:`tests.deploy.harness` for the commands.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedpeft import constants as K
from fedpeft.client.app import make_client_app
from fedpeft.config import compose_config, from_yaml
from fedpeft.deploy import make_certificates, make_site_keys
from fedpeft.server.federation import run_federation
from fedpeft.server.rundir import RunDir
from fedpeft.testing import InProcessGrid, write_classification_csv
from tests.deploy.harness import LoopbackDeployment, descendants

pytestmark = pytest.mark.slow

SITES = ("site-1", "site-2", "site-3")
# Fast polls where Flower has a public setting for it (the SuperExec's task poll).
ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}
# The tiny DP experiment; one torch thread per site process (three sites share two cores);
# no evaluation (each evaluate message costs every site one more fresh ClientApp process,
# i.e. one more torch import; simulation tests cover evaluation); bounded waits, so a broken
# run fails instead of hanging. data.path is each site's own (node config data-path); the
# coordinator's value is never read.
BASE = (
    "experiment=tiny_private privacy.accountant=rdp data.path=/sites-own/data.csv "
    "train.num_threads=1 federation.fraction_evaluate=0 federation.round_timeout=240 "
    "secagg.stage_timeout=120"
)


def _data(root: Path) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    return [write_classification_csv(root / f"{n}.csv", n=64, seed=i) for i, n in enumerate(SITES)]


def _start_sites(
    dep: LoopbackDeployment, root: Path, workers: dict[str, list[str]] | None = None
) -> list[Any]:
    """Start the SuperLink and the three sites; ``workers`` gives a site its own worker."""
    dep.start_superlink()
    sites = dep.make_sites(list(SITES), _data(root / "data"))
    for site in sites:
        dep.start_site(
            site,
            worker_command=(workers or {}).get(site.name),
            **{"privacy-epsilon-max": 8.0, "privacy-delta": 1e-5, "device": "auto"},
        )
    dep.wait_online(len(SITES), timeout=120)
    return sites


def _rounds_done(run_dir: Path) -> int:
    checkpoint = RunDir(run_dir).latest_checkpoint() if run_dir.is_dir() else None
    return 0 if checkpoint is None else checkpoint.round


def _ledger(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text())["entries"])


def test_secure_private_federation_over_tls(tmp_path: Path) -> None:
    with LoopbackDeployment(tmp_path, env=ENV) as dep:
        sites = _start_sites(dep, tmp_path)
        registered = set(dep.online_nodes())

        # Three SuperNodes that must be refused, started beside the real federation.
        rogue = make_site_keys(tmp_path / "rogue-keys", ["rogue"])[0]  # never registered
        spare = make_site_keys(tmp_path / "spare-keys", ["spare"])[0]
        dep.flwr("supernode", "register", str(spare.public_key))  # registered, wrong CA
        other_ca = make_certificates(tmp_path / "other-ca")
        refused = {
            "unregistered": dep.start_supernode(
                "unregistered", private_key=rogue.private_key, give_up_after=10
            ),
            "plaintext": dep.start_supernode("plaintext", insecure=True, give_up_after=10),
            "wrong-ca": dep.start_supernode(
                "wrong-ca",
                private_key=spare.private_key,
                root_certificates=other_ca.ca_cert,
                give_up_after=10,
            ),
        }

        run_dir = tmp_path / "run"
        run_id = dep.submit(f"{BASE} secagg.enabled=true output_dir={run_dir}")

        for name, proc in refused.items():
            assert proc.wait(timeout=120) != 0, f"the {name} SuperNode was not refused"
        superlink_log = dep.logs["superlink"].read_text(errors="replace")
        assert "No SuperNode found with the given public key" in superlink_log
        for name in refused:
            assert (
                "Failed to initialize the connection" in dep.logs[f"supernode-{name}"].read_text()
            )

        record = dep.wait_run(run_id, timeout=480, ready=lambda: _rounds_done(run_dir) == 2)
        assert record["status"] == "finished:completed", dep.tail()
        assert set(dep.online_nodes()) == registered  # no refused node ever joined
        before = {site.name: _ledger(site.ledger) for site in sites}

        # Anyone who reaches the Control API can submit a run; unsigned, it costs no site a
        # thing: every site refuses with the fixed code and charges nothing, and the
        # federation ends at once (no site can train) with the reason on record.
        rogue_dir = tmp_path / "rogue-run"
        rogue = dep.submit(f"{BASE} federation.rounds=2 output_dir={rogue_dir}", signed=False)
        aborted = rogue_dir / "aborted.json"
        record = dep.wait_run(rogue, timeout=300, ready=aborted.is_file)
        assert record["status"] == "finished:failed", dep.tail()
        assert K.ERR_SIGNATURE in json.loads(aborted.read_text())["reason"]
        (rogue_row,) = RunDir(rogue_dir).read_metrics()  # round 2 never started
        assert not rogue_row["updated"] and rogue_row["sites_failed"] == 3
        assert all(reason.startswith(K.ERR_SIGNATURE) for reason in rogue_row["failures"].values())
        assert {site.name: _ledger(site.ledger) for site in sites} == before

    rows = RunDir(run_dir).read_metrics()
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["sites_sampled"] == row["sites_replied"] == 3 and row["sites_failed"] == 0
        assert row["updated"] and row["secagg"] and row["train_loss"] is None  # not sent
        assert sorted(row["epsilon"]) == sorted(str(n) for n in registered)
    assert 0 < rows[0]["epsilon_max"] < rows[1]["epsilon_max"] <= 8.0

    checkpoint = RunDir(run_dir).latest_checkpoint()
    assert checkpoint is not None and checkpoint.round == 2
    tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    saved = np.concatenate([t.reshape(-1) for t in tensors.values()])
    assert saved.size == checkpoint.global_flat.size and np.all(np.isfinite(saved))
    config = from_yaml((run_dir / "config.yaml").read_text())
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == (
        config.lora.r
    )

    federation_id = json.loads((run_dir / "federation.json").read_text())["federation_id"]
    report = json.loads((run_dir / "privacy.json").read_text())
    for site in sites:
        entries = _ledger(site.ledger)
        assert [(e["run_id"], e["round"]) for e in entries] == [
            (federation_id, 1),
            (federation_id, 2),
        ]
    assert all(s["epsilon"] <= 8.0 for s in report["sites"].values())


def _serverapp_pids(dep: LoopbackDeployment) -> list[int]:
    superlink = dep.processes[0].pid
    found = []
    for pid in descendants(superlink):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"flwr-serverapp" in cmdline:
            found.append(pid)
    return found


def _node_ids(dep: LoopbackDeployment) -> dict[str, int]:
    """Site name → its SuperNode's id, from the SuperNodes' logs."""
    found = {}
    for site in SITES:
        log = dep.logs[f"supernode-{site}"].read_text(errors="replace")
        match = re.search(r"SuperNode ID: (\d+)", log)
        assert match is not None, log[-2000:]
        found[site] = int(match.group(1))
    return found


def _uncrashed_reference(
    root: Path, sites: list[Any], node_ids: dict[str, int], federation_id: str
) -> RunDir:
    """The same federation run in this process without a crash.

    Same federation id, node ids, data files, configuration and site secrets (beside the
    ledgers): the sites draw the same DP noise, so the result must be the same.
    """
    ledgers = root / "reference-ledgers"
    ledgers.mkdir()
    for site in sites:
        secret = site.ledger.with_name(site.ledger.name + ".secret")
        shutil.copy2(secret, ledgers / secret.name)
    config = compose_config(BASE.split())
    node_configs = {
        node_ids[site.name]: {
            K.NODE_DATA_PATH: str(site.data),
            K.NODE_LEDGER_PATH: str(ledgers / site.ledger.name),
            K.NODE_EPSILON_MAX: 8.0,
            K.NODE_DELTA: 1e-5,
            K.NODE_DEVICE: "auto",
        }
        for site in sites
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("fedpeft.server.federation.uuid.uuid4", lambda: uuid.UUID(hex=federation_id))
        grid = InProcessGrid(make_client_app(config), node_configs)
        run_federation(grid, config, run_dir=root / "reference")
    return RunDir(root / "reference")


def test_killed_serverapp_resumes_without_charging_a_round_twice(tmp_path: Path) -> None:
    with LoopbackDeployment(tmp_path, env=ENV) as dep:
        sites = _start_sites(dep, tmp_path)
        node_ids = _node_ids(dep)
        run_dir = tmp_path / "run"
        overrides = f"{BASE} output_dir={run_dir}"
        first = dep.submit(overrides)

        # Kill the ServerApp process as soon as round 1 is checkpointed.
        deadline = time.monotonic() + 300
        while _rounds_done(run_dir) < 1:
            assert time.monotonic() < deadline, dep.tail()
            time.sleep(0.5)
        victims = _serverapp_pids(dep)
        assert victims, dep.tail()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        assert dep.wait_run(first, timeout=120, ask_every=5)["status"] != "finished:completed"
        done_before = [r["round"] for r in RunDir(run_dir).read_metrics()]
        assert done_before in ([1], [1, 2])  # round 2 may have been written as it died

        second = dep.submit(overrides, resume_from=str(run_dir))
        record = dep.wait_run(second, timeout=300, ready=lambda: _rounds_done(run_dir) == 2)
        assert record["status"] == "finished:completed", dep.tail()

    rows = RunDir(run_dir).read_metrics()
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["sites_replied"] == 3 for r in rows)
    federation_id = json.loads((run_dir / "federation.json").read_text())["federation_id"]
    for site in sites:  # whatever round 2 was doing at the kill, it is charged once
        entries = _ledger(site.ledger)
        assert [(e["run_id"], e["round"]) for e in entries] == [
            (federation_id, 1),
            (federation_id, 2),
        ]

    # The result a run without the crash gives: the same federation, uninterrupted.
    reference = _uncrashed_reference(tmp_path, sites, node_ids, federation_id)
    resumed, expected = RunDir(run_dir).latest_checkpoint(), reference.latest_checkpoint()
    assert resumed is not None and expected is not None and expected.round == 2
    np.testing.assert_allclose(resumed.global_flat, expected.global_flat, rtol=0, atol=1e-6)
    for got, want in zip(rows, reference.read_metrics(), strict=True):
        assert got["train_loss"] is None and want["train_loss"] is None  # not sent under DP
        assert got["epsilon"] == pytest.approx(want["epsilon"], rel=1e-9)


def _tasks_done(dep: LoopbackDeployment, site: str, what: str) -> bool:
    log = dep.logs[f"worker-{site}"]
    return log.is_file() and what in log.read_text(errors="replace")


def test_a_site_killed_mid_round_is_recovered_by_secure_aggregation(tmp_path: Path) -> None:
    with LoopbackDeployment(tmp_path, env=ENV) as dep:
        sites = _start_sites(dep, tmp_path)
        run_dir = tmp_path / "run"
        run_id = dep.submit(
            f"{BASE} secagg.enabled=true federation.rounds=3 secagg.stage_timeout=60 "
            f"output_dir={run_dir}"
        )
        # site-3 dies in round 2 after it sent its encrypted shares, before its masked
        # update: the other two must reveal its secrets' shares to unmask the sum.
        deadline = time.monotonic() + 300
        shared = f"round 2 train.{K.SECAGG_SHARE_KEYS} task:"
        while not _tasks_done(dep, "site-3", shared):
            assert time.monotonic() < deadline, dep.tail()
            time.sleep(0.1)
        dep.kill("worker-site-3")
        dep.kill("supernode-site-3")
        record = dep.wait_run(run_id, timeout=400, ready=lambda: _rounds_done(run_dir) == 3)
        assert record["status"] == "finished:completed", dep.tail()

    rows = RunDir(run_dir).read_metrics()
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["sites_replied"] == 3
    assert rows[1]["sites_replied"] == 2 and rows[1]["sites_dropped"] >= 1
    assert all(r["updated"] and r["secagg"] and r["train_loss"] is None for r in rows)
    assert rows[2]["sites_replied"] == 2
    federation_id = json.loads((run_dir / "federation.json").read_text())["federation_id"]
    charged = {s.name: [(e["run_id"], e["round"]) for e in _ledger(s.ledger)] for s in sites}
    assert charged["site-1"] == charged["site-2"] == [(federation_id, r) for r in (1, 2, 3)]
    assert charged["site-3"] == [(federation_id, 1)]  # killed before it trained in round 2


def test_a_malformed_update_over_the_wire_is_rejected_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    tampering = [sys.executable, str(Path(__file__).with_name("tampering_worker.py"))]
    with LoopbackDeployment(tmp_path, env=ENV) as dep:
        _start_sites(dep, tmp_path, workers={"site-3": tampering})
        run_dir = tmp_path / "run"
        run_id = dep.submit(f"{BASE} output_dir={run_dir}")
        record = dep.wait_run(run_id, timeout=300, ready=lambda: _rounds_done(run_dir) == 2)
        assert record["status"] == "finished:completed", dep.tail()
        log = dep.logs["supernode-site-3"].read_text(errors="replace")
        tamperer = re.search(r"SuperNode ID: (\d+)", log)
        assert tamperer is not None, log[-2000:]
        server_log = dep.run_log(run_id)
        assert server_log.count(f"update rejected: node {tamperer.group(1)}") == 2, server_log

    rows = RunDir(run_dir).read_metrics()
    assert [r["round"] for r in rows] == [1, 2]
    for row, why in zip(rows, ("non-finite values", "vector of shape"), strict=True):
        assert row["sites_replied"] == 2 and row["sites_failed"] == 1 and row["updated"]
        assert list(row["failures"]) == [tamperer.group(1)]
        failure = row["failures"][tamperer.group(1)]
        assert failure.startswith(f"rejected: node {tamperer.group(1)}") and why in failure
    checkpoint = RunDir(run_dir).latest_checkpoint()
    assert checkpoint is not None and np.all(np.isfinite(checkpoint.global_flat))
