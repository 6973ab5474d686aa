"""A crashed ServerApp resumes its federation: no finished round lost, repeated or charged twice."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from fedpeft import constants as K
from fedpeft.client.app import make_client_app
from fedpeft.config import ConfigError, FedPeftConfig, compose_config, read_run_config
from fedpeft.lineage import adapter_sha256
from fedpeft.privacy.trail import read_trail
from fedpeft.server.federation import run_federation
from fedpeft.server.rundir import RunDir
from fedpeft.testing import InProcessGrid, write_classification_csv

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha:UserWarning"),
]
NODES = (11, 22, 33)
# Grid exchanges per round: plain = train + evaluate; secure = 4 SecAgg+ stages of training
# + 4 of the secure evaluation. The crash comes right after the sites answered round 2's
# training exchange: they have trained and charged round 2 to their ledgers (binding and
# release digest recorded), the server has not checkpointed it.
CRASH_AFTER = {"plain": 2 + 1, "secure": 8 + 3}
# Secure aggregation rounds each update stochastically before masking (fedpeft.privacy.quantize),
# so two secure runs agree within the quantisation error; plain runs agree exactly.
TOLERANCE = {"plain": 0.0, "secure": 1e-6}
# Figures that must match an uninterrupted run (seconds differ, of course).
COMPARED = (
    "round",
    "sites_sampled",
    "sites_replied",
    "sites_failed",
    "sites_dropped",
    "updated",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "eval_sites",
    "bytes_up",
    "bytes_down",
    "epsilon",
)


class ServerCrash(RuntimeError):
    """Stands for the ServerApp process dying."""


class CrashingGrid(InProcessGrid):
    """Delivers messages until exchange number ``crash_after`` has been answered, then dies."""

    def __init__(self, *args: Any, crash_after: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crash_after = crash_after
        self.exchanges = 0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = super().send_and_receive(messages, timeout=timeout)
        self.exchanges += 1
        if self.exchanges == self.crash_after:
            raise ServerCrash(f"server died after exchange {self.exchanges}")
        return replies


def _config(tmp_path: Path, mode: str) -> FedPeftConfig:
    return compose_config(
        [
            "experiment=tiny_private",
            f"data.path={tmp_path / 'unused.csv'}",
            "privacy.accountant=rdp",  # fast; the accountant is not what is tested here
            f"secagg.enabled={str(mode == 'secure').lower()}",
        ]
    )


def _node_configs(tmp_path: Path, ledgers: str, **extra: Any) -> dict[int, dict[str, Any]]:
    configs = {}
    for node in NODES:
        # One CSV per site shared by both federations: a site's seed includes its data path.
        csv = tmp_path / f"site{node}.csv"
        if not csv.exists():
            write_classification_csv(csv, n=64, seed=node)
        configs[node] = {
            K.NODE_DATA_PATH: str(csv),
            K.NODE_LEDGER_PATH: str(tmp_path / ledgers / f"ledger{node}.json"),
            K.NODE_EPSILON_MAX: 100.0,  # required at a deployed site; the run's ε applies
            K.NODE_DELTA: 1e-5,  # and its own δ
            **extra,
        }
    return configs


def _ledger(tmp_path: Path, ledgers: str, node: int) -> list[dict[str, Any]]:
    path = tmp_path / ledgers / f"ledger{node}.json"
    return list(json.loads(path.read_text())["entries"])


@pytest.mark.parametrize("mode", ["plain", "secure"])
def test_resumed_federation_equals_an_uninterrupted_one(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sites draw DP randomness from HMAC(site secret, federation id / round): the reference
    # and the crashed federation must be the same federation of the same sites to agree.
    monkeypatch.setattr("fedpeft.server.federation.uuid.uuid4", lambda: uuid.UUID(int=7))
    config = _config(tmp_path, mode)
    app = make_client_app(config)
    reference = tmp_path / "reference"
    run_federation(
        InProcessGrid(app, _node_configs(tmp_path, "ledgers-a")), config, run_dir=reference
    )

    # Each site's DP randomness comes from its own secret beside its ledger: the crashed
    # federation's sites are the same sites, so they hold the same secrets.
    (tmp_path / "ledgers-b").mkdir(exist_ok=True)
    for secret in (tmp_path / "ledgers-a").glob("*.secret"):
        shutil.copy2(secret, tmp_path / "ledgers-b" / secret.name)
    crashed = tmp_path / "crashed"
    grid = CrashingGrid(app, _node_configs(tmp_path, "ledgers-b"), crash_after=CRASH_AFTER[mode])
    with pytest.raises(ServerCrash):
        run_federation(grid, config, run_dir=crashed)
    assert [r["round"] for r in RunDir(crashed).read_metrics()] == [1]
    assert all(len(_ledger(tmp_path, "ledgers-b", n)) == 2 for n in NODES)  # round 2 charged

    # The restarted server: a new Flower run id, the same run directory.
    fresh = InProcessGrid(app, _node_configs(tmp_path, "ledgers-b"), run_id=99)
    rows = run_federation(fresh, config, run_dir=crashed, resume=True)

    expected = RunDir(reference).read_metrics()
    assert [r["round"] for r in rows] == [1, 2]
    federation_id = json.loads((crashed / "federation.json").read_text())["federation_id"]
    if mode == "secure":
        # Under secure aggregation every secure session is its own release (the same
        # instruction masked in another group of sites could be subtracted), so two runs of
        # one federation differ, and the round retried after the crash is another release:
        # fresh noise and a fresh charge, or, when the site's planned budget has no room for
        # it, a budget refusal. Never the same noise twice.
        for node in NODES:
            entries = _ledger(tmp_path, "ledgers-b", node)
            rounds = [e["round"] for e in entries]
            assert rounds.count(1) == 1 and rounds.count(2) in (1, 2)
            assert len({e["binding"] for e in entries}) == len(entries)
        assert rows[1]["updated"] or all(
            reason.split(":")[0] == K.REFUSAL_BUDGET for reason in rows[1]["failures"].values()
        )
        return
    tol = TOLERANCE[mode]
    for got, want in zip(rows, expected, strict=True):
        want_figures = {
            k: pytest.approx(v, rel=tol, abs=tol) if isinstance(v, float) else v
            for k, v in ((k, want[k]) for k in COMPARED)
        }
        assert {k: got[k] for k in COMPARED} == want_figures
    resumed_adapter = RunDir(crashed).latest_checkpoint()
    reference_adapter = RunDir(reference).latest_checkpoint()
    assert resumed_adapter is not None and reference_adapter is not None
    assert resumed_adapter.round == reference_adapter.round == 2
    np.testing.assert_allclose(
        resumed_adapter.global_flat, reference_adapter.global_flat, rtol=0, atol=tol
    )
    round_one = np.load(reference / "checkpoints" / "round-0001" / "global.npy")
    assert np.abs(reference_adapter.global_flat - round_one).max() > 100 * max(tol, 1e-9)
    assert (crashed / "adapter" / "adapter_model.safetensors").is_file()

    for node in NODES:
        entries = _ledger(tmp_path, "ledgers-b", node)
        assert [(e["run_id"], e["round"]) for e in entries] == [
            (federation_id, 1),
            (federation_id, 2),
        ]  # round 2 trained twice, charged once
        same = [e["noise_multiplier"] for e in _ledger(tmp_path, "ledgers-a", node)]
        assert [e["noise_multiplier"] for e in entries] == same
    report = json.loads((crashed / "privacy.json").read_text())
    assert report["sites"]["11"]["epsilon"] == expected[-1]["epsilon"]["11"]
    # the resumed coordinator continued its audit trail: one chain, start → resume, and the
    # adapter on disk is the one it logged last
    trail = read_trail(crashed / "audit.jsonl")
    assert trail.ok, trail.problem
    events = [(e["event"], e.get("round")) for e in trail.entries]
    assert events == [("start", None), ("round", 1), ("resume", None), ("round", 2)]
    assert trail.entries[-1]["adapter_sha256"] == rows[-1]["adapter_sha256"]
    assert rows[-1]["adapter_sha256"] == adapter_sha256(crashed / "adapter")


def _one_round(tmp_path: Path, *extra: str) -> FedPeftConfig:
    """A one-round federation without DP: these tests are about the run directory."""
    return compose_config(
        [
            "experiment=tiny_classification",
            f"data.path={tmp_path / 'unused.csv'}",
            "federation.rounds=1",
            *extra,
        ]
    )


def _plain_sites(tmp_path: Path) -> dict[int, dict[str, Any]]:
    """Sites that accept a run without DP (these federations are about the run directory)."""
    return _node_configs(tmp_path, "ledgers", **{K.NODE_PRIVACY_REQUIRED: "false"})


def test_resume_after_the_last_round_runs_nothing(tmp_path: Path) -> None:
    config = _one_round(tmp_path)
    grid = InProcessGrid(make_client_app(config), _plain_sites(tmp_path))
    run_federation(grid, config, run_dir=tmp_path / "run")
    sent = len(grid.sent)
    rows = run_federation(grid, config, run_dir=tmp_path / "run", resume=True)
    assert [r["round"] for r in rows] == [1] and len(grid.sent) == sent


def test_resume_refuses_another_configuration(tmp_path: Path) -> None:
    config = _one_round(tmp_path)
    grid = InProcessGrid(make_client_app(config), _plain_sites(tmp_path))
    run_federation(grid, config, run_dir=tmp_path / "run")
    sent = len(grid.sent)
    other = _one_round(tmp_path, "train.local_steps=4")
    with pytest.raises(ConfigError, match=r"train\.local_steps: 3 -> 4.*same overrides"):
        run_federation(grid, other, run_dir=tmp_path / "run", resume=True)
    assert len(grid.sent) == sent


def test_resume_from_a_missing_or_foreign_folder_is_a_clear_error(tmp_path: Path) -> None:
    config = _config(tmp_path, "plain")
    grid = InProcessGrid(make_client_app(config), _node_configs(tmp_path, "ledgers"))
    with pytest.raises(ConfigError, match="does not exist"):
        run_federation(grid, config, run_dir=tmp_path / "nowhere", resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a fedpeft run directory"):
        run_federation(grid, config, run_dir=tmp_path / "empty", resume=True)
    assert grid.sent == []


def test_run_config_resume_from() -> None:
    base = {K.RUN_OVERRIDES: "experiment=tiny_classification data.path=/x.csv"}
    assert read_run_config(base).resume_from is None
    settings = read_run_config({**base, K.RUN_RESUME_FROM: " /srv/runs/a "})
    assert settings.resume_from == "/srv/runs/a"
    assert settings.config.federation.rounds == 2
    with pytest.raises(ConfigError, match="resume-from=3 must be a string"):
        read_run_config({**base, K.RUN_RESUME_FROM: 3})
