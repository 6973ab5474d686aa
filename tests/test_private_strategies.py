"""Every strategy under differential privacy and secure aggregation together.

On the in-process grid (fast): fedavg, ffa, fedsvd and ffa with FedAdam on the server each run
a small federation with DP-SGD at every site and SecAgg+; rounds complete, the adapter moves and
every site's ε is reported. The noise multiplier is fixed (``privacy.noise_multiplier``) so the
sites skip calibration, which :mod:`tests.test_private_federation` covers. One slow test runs
FedSVD with DP and secure aggregation through Flower's real simulation engine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedpeft import constants as K
from fedpeft.client.app import make_client_app
from fedpeft.config import compose_config
from fedpeft.server.federation import Federation
from fedpeft.server.progress import Progress
from fedpeft.server.rundir import RunDir
from fedpeft.testing import InProcessGrid, write_classification_csv

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
    pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha:UserWarning"),
]
NODES = (11, 22, 33)
STRATEGIES = {
    "fedavg": ["strategy=fedavg"],
    "ffa": ["strategy=ffa"],
    "fedsvd": ["strategy=fedsvd"],
    "ffa-adam": ["strategy=ffa", "strategy.server_optimizer=adam", "strategy.server_lr=0.01"],
}


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_strategy_runs_under_dp_and_secure_aggregation(tmp_path: Path, strategy: str) -> None:
    config = compose_config(
        [
            "experiment=tiny_private",
            f"data.path={tmp_path / 'unused.csv'}",
            "privacy.accountant=rdp",
            "privacy.noise_multiplier=1.0",
            "secagg.enabled=true",
            "train.local_steps=1",
            "federation.fraction_evaluate=0",  # evaluation is not what this test is about
            *STRATEGIES[strategy],
        ]
    )
    node_configs = {
        n: {
            K.NODE_DATA_PATH: str(write_classification_csv(tmp_path / f"s{n}.csv", n=48, seed=n)),
            K.NODE_LEDGER_PATH: str(tmp_path / f"ledger{n}.json"),
            K.NODE_EPSILON_MAX: 100.0,  # required at a deployed site; the run's ε applies
            K.NODE_DELTA: 1e-5,  # and its own δ
        }
        for n in NODES
    }
    grid = InProcessGrid(make_client_app(config), node_configs)
    federation = Federation(grid, config, RunDir(tmp_path / "run"), Progress())
    start = federation.global_flat.copy()
    federation.run()
    rows = _rows(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["updated"] and row["secagg"] and row["sites_replied"] == 3
        assert row["failures"] == {}
    assert np.isfinite(federation.global_flat).all()
    assert not np.allclose(federation.global_flat, start)
    first, second = rows[0]["epsilon"], rows[1]["epsilon"]
    assert set(second) == {str(n) for n in NODES}
    assert all(0 < first[s] < second[s] < math.inf for s in second)  # ε grows with each round
    report = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert report["differential_privacy"]["enabled"] is True
    assert {s["noise_multiplier"] for s in report["sites"].values()} == {1.0}


@pytest.mark.slow
def test_fedsvd_with_dp_and_secagg_through_flowers_engine(tmp_path: Path) -> None:
    from fedpeft.simulation import simulate

    data = write_classification_csv(tmp_path / "all.csv", n=180, seed=0)
    config = compose_config(
        [
            "experiment=tiny_private",
            f"data.path={data}",
            "privacy.accountant=rdp",
            "privacy.epsilon=8",
            "strategy=fedsvd",
            "secagg.enabled=true",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    result = simulate(config)
    assert [r["round"] for r in result.rows] == [1, 2]
    for row in result.rows:
        assert row["updated"] and row["secagg"]
        assert row["sites_sampled"] == row["sites_replied"] == 3
        assert row["train_loss"] is None  # under DP a site sends no train loss
        assert np.isfinite(row["eval_loss"])
    epsilons = result.rows[-1]["epsilon"]
    assert len(epsilons) == 3 and all(0 < e <= 8.0 for e in epsilons.values())
