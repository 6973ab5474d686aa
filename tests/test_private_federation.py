"""Differential privacy across a federation: ledgers, ceilings, refusals, reported ε."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpeft import constants as K
from fedpeft.client.app import make_client_app
from fedpeft.config import FedPeftConfig, compose_config
from fedpeft.model import build_model, get_flat, is_bias, is_head, split_flat
from fedpeft.privacy.calibration import compute_epsilon
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


def _config(tmp_path: Path, *overrides: str) -> FedPeftConfig:
    # RDP keeps these tests fast; the first test checks the default accountant (PRV).
    return compose_config(
        [
            "experiment=tiny_private",
            f"data.path={tmp_path / 'unused.csv'}",
            "privacy.accountant=rdp",
            *overrides,
        ]
    )


def _grid(
    config: FedPeftConfig,
    tmp_path: Path,
    *,
    run_id: int = 1,
    extra: dict[int, dict[str, Any]] | None = None,
) -> InProcessGrid:
    node_configs: dict[int, dict[str, Any]] = {}
    for node in NODES:
        csv = tmp_path / f"site{node}.csv"
        if not csv.exists():
            write_classification_csv(csv, n=64, seed=node)
        node_configs[node] = {
            K.NODE_DATA_PATH: str(csv),
            K.NODE_LEDGER_PATH: str(tmp_path / f"ledger{node}.json"),
            K.NODE_EPSILON_MAX: 100.0,  # a deployed site must set one; high: the run's ε applies
            K.NODE_DELTA: 1e-5,  # a deployed site's own δ
            **(extra or {}).get(node, {}),
        }
    return InProcessGrid(make_client_app(config), node_configs, run_id=run_id)


def _ledger(tmp_path: Path, node: int) -> dict[str, Any]:
    return json.loads((tmp_path / f"ledger{node}.json").read_text())


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_reported_epsilon_is_opacus_on_the_ledger_and_within_target(tmp_path: Path) -> None:
    config = _config(tmp_path, "privacy.epsilon=4", "privacy.accountant=prv")
    run_federation(_grid(config, tmp_path), config, run_dir=tmp_path / "run")
    rows = _rows(tmp_path / "run")
    report = json.loads((tmp_path / "run" / "privacy.json").read_text())
    for node in NODES:
        ledger = _ledger(tmp_path, node)
        assert [e["round"] for e in ledger["entries"]] == [1, 2]
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in ledger["entries"]]
        expected = compute_epsilon(history, delta=ledger["delta"], accountant="prv")
        assert rows[-1]["epsilon"][str(node)] == pytest.approx(expected, rel=1e-9)
        assert rows[0]["epsilon"][str(node)] < rows[1]["epsilon"][str(node)] <= 4.0
        assert rows[1]["epsilon"][str(node)] > 3.8  # calibrated to use the budget, not waste it
        site = report["sites"][str(node)]
        assert site["epsilon"] == pytest.approx(expected, rel=1e-9)
        # the federation's δ and q, the same at every site: nothing here depends on N
        assert site["delta"] == 1e-5 and site["sampling_rate"] == 0.125
        assert site["steps"] == 6 and site["clip_norm"] == 1.0 and site["accountant"] == "prv"
        assert site["noise_multiplier"] > 0
    assert report["differential_privacy"]["enabled"] is True
    assert report["secure_aggregation"]["server_sees"] == "each site's update in the clear"


def test_site_ceiling_wins_over_the_coordinator(tmp_path: Path) -> None:
    config = _config(tmp_path, "privacy.epsilon=100")
    grid = _grid(config, tmp_path, extra={22: {K.NODE_EPSILON_MAX: 1.5}})
    run_federation(grid, config, run_dir=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert report["sites"]["22"]["epsilon_ceiling"] == 1.5
    assert report["sites"]["22"]["epsilon"] <= 1.5
    assert report["sites"]["11"]["epsilon"] > 1.5  # the others use the coordinator's target


def test_budget_refusal_trains_nothing_and_federation_goes_on(tmp_path: Path) -> None:
    # A fixed σ = 0.8 (q = 0.125, 3 steps, δ = 1e-5) gives ε 4.56 after round 1 and 5.44
    # after round 2 (RDP): a ceiling of 5 fits round 1 only.
    config = _config(tmp_path, "privacy.noise_multiplier=0.8", "federation.rounds=3")
    grid = _grid(config, tmp_path, extra={33: {K.NODE_EPSILON_MAX: 5.0}})
    run_federation(grid, config, run_dir=tmp_path / "run")
    rows = _rows(tmp_path / "run")
    code, text = K.SITE_ERRORS[K.REFUSAL_BUDGET]
    assert rows[1]["failures"]["33"] == f"{K.REFUSAL_BUDGET}: {text}"  # fixed, no figures
    assert [e["round"] for e in _ledger(tmp_path, 33)["entries"]] == [1]  # nothing charged
    assert rows[1]["sites_replied"] == 2 and rows[1]["updated"]
    assert rows[2]["sites_sampled"] == 2  # the exhausted site is no longer asked
    report = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert report["sites"]["33"]["budget_exhausted"] and report["sites"]["33"]["epsilon"] <= 5.0


def test_federation_ends_clearly_when_too_few_sites_have_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(
        tmp_path, "privacy.noise_multiplier=0.8", "federation.rounds=3", "federation.min_sites=2"
    )
    grid = _grid(config, tmp_path, extra={n: {K.NODE_EPSILON_MAX: 5.0} for n in (22, 33)})
    run_federation(grid, config, run_dir=tmp_path / "run")
    assert [r["round"] for r in _rows(tmp_path / "run")] == [1, 2]
    assert "federation ended before round 3: 1 site(s) left with privacy budget" in (
        capsys.readouterr().err
    )


def test_ledger_survives_runs_and_the_second_run_fits_the_rest(tmp_path: Path) -> None:
    config = _config(tmp_path, "privacy.epsilon=4")
    run_federation(_grid(config, tmp_path, run_id=1), config, run_dir=tmp_path / "run1")
    first = _rows(tmp_path / "run1")[-1]["epsilon"]["11"]
    run_federation(_grid(config, tmp_path, run_id=2), config, run_dir=tmp_path / "run2")
    second = _rows(tmp_path / "run2")[-1]["epsilon"]["11"]
    entries = _ledger(tmp_path, 11)["entries"]
    federations = [
        json.loads((tmp_path / run / "federation.json").read_text())["federation_id"]
        for run in ("run1", "run2")
    ]  # each federation's own id keys its rounds (not Flower's run id)
    assert federations[0] != federations[1]
    assert [(e["run_id"], e["round"]) for e in entries] == [
        (federations[0], 1),
        (federations[0], 2),
        (federations[1], 1),
        (federations[1], 2),
    ]
    assert first < second <= 4.0  # calibrated to what the first run left
    assert entries[2]["noise_multiplier"] > entries[0]["noise_multiplier"]


def test_impossible_target_is_an_error_before_training(tmp_path: Path) -> None:
    from fedpeft.server.federation import FederationAborted

    config = _config(tmp_path, "privacy.epsilon=0.001", "federation.rounds=2")
    # every site refuses: the federation ends after round 1 instead of repeating it
    with pytest.raises(FederationAborted, match="no site can train"):
        run_federation(_grid(config, tmp_path), config, run_dir=tmp_path / "run")
    (row,) = _rows(tmp_path / "run")
    assert not row["updated"] and row["sites_failed"] == 3
    assert all(reason.startswith(K.ERR_SITE_CONFIG) for reason in row["failures"].values())
    assert all(_ledger(tmp_path, n)["entries"] == [] for n in NODES)


def test_a_site_without_ledger_path_refuses(tmp_path: Path) -> None:
    config = _config(tmp_path, "federation.rounds=1")
    grid = _grid(config, tmp_path)
    del grid.contexts[11].node_config[K.NODE_LEDGER_PATH]
    run_federation(grid, config, run_dir=tmp_path / "run")
    (row,) = _rows(tmp_path / "run")
    assert row["failures"]["11"].startswith(K.ERR_LEDGER_REQUIRED) and row["sites_replied"] == 2


def test_dp_randomness_is_the_sites_secret_not_the_coordinators(tmp_path: Path) -> None:
    """Same config and data, different site secrets → different noise and sampling."""
    from fedpeft.client.budget import site_secret

    def delta_of_site_11(folder: str) -> Any:
        config = _config(tmp_path / folder, "federation.rounds=1")
        (tmp_path / folder).mkdir(exist_ok=True)
        grid = _grid(config, tmp_path / folder)
        run_federation(grid, config, run_dir=tmp_path / folder / "run")
        (reply,) = [
            m
            for m in grid.received
            if m.metadata.src_node_id == 11 and K.LAYOUT in m.content.config_records
        ]
        return reply.content.array_records[K.ARRAYS][K.ARRAY_FLAT].numpy()

    first, second = delta_of_site_11("a"), delta_of_site_11("b")
    assert not np.allclose(first, second)  # each site drew its own secret
    secret = tmp_path / "a" / "ledger11.json.secret"
    assert (
        secret.stat().st_mode & 0o777 == 0o600
        and len(site_secret(tmp_path / "a" / "ledger11.json")) == 32
    )
    # the same binding draws the same key (a retry repeats itself); another binding or
    # another secret draws an independent one
    from fedpeft.privacy.binding import release_key

    key = site_secret(tmp_path / "a" / "ledger11.json")
    assert release_key(key, "b1") == release_key(key, "b1")
    assert release_key(key, "b1") != release_key(key, "b2")
    assert release_key(bytes(32), "b1") != release_key(key, "b1")


def test_a_round_with_other_inputs_is_charged_again(tmp_path: Path) -> None:
    """Same (federation, round) again: free only as a retry with the same binding."""
    from fedpeft.client.budget import site_budget

    config = _config(tmp_path, "privacy.noise_multiplier=1.0")
    node = {
        K.NODE_LEDGER_PATH: str(tmp_path / "ledger.json"),
        K.NODE_EPSILON_MAX: 100.0,
        K.NODE_DELTA: 1e-5,
    }
    plan = site_budget(config, node, site_name="s", num_train=51, run_id="fed")
    plan.charge(run_id="fed", round_number=1, binding="a" * 64)
    plan.charge(run_id="fed", round_number=1, binding="a" * 64)  # a retry: charged once
    plan.charge(run_id="fed", round_number=1, binding="b" * 64)  # other inputs: again
    entries = json.loads((tmp_path / "ledger.json").read_text())["entries"]
    assert [(e["run_id"], e["round"], e["binding"][0]) for e in entries] == [
        ("fed", 1, "a"),
        ("fed", 1, "b"),
    ]


def test_a_private_bitfit_federation_under_secure_aggregation_moves_only_biases_and_head(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, "lora.bias=all", "train.trainable=[bias]", "secagg.enabled=true")
    run_federation(_grid(config, tmp_path), config, run_dir=tmp_path / "run")
    rows = _rows(tmp_path / "run")
    assert [r["updated"] for r in rows] == [True, True] and all(r["secagg"] for r in rows)
    for node in NODES:  # each BitFit round charged once, within the target
        assert [e["round"] for e in _ledger(tmp_path, node)["entries"]] == [1, 2]
        assert 0 < rows[-1]["epsilon"][str(node)] <= config.privacy.epsilon
    loaded = build_model(config.model, config.lora, seed=config.seed)
    start = split_flat(get_flat(loaded.peft_model, loaded.layout), loaded.layout)
    checkpoint = RunDir(tmp_path / "run").latest_checkpoint()
    assert checkpoint is not None
    end = split_flat(checkpoint.global_flat, loaded.layout)
    moved = {n for n in loaded.layout.names if not np.array_equal(start[n], end[n])}
    assert any(is_bias(n) for n in moved) and all(is_bias(n) or is_head(n) for n in moved)
