"""``benchmarks/quality.py --quick`` runs as a user would run it and writes the expected JSON.

Its own process, into a temporary folder (never ``benchmarks/results``); only the shape of the
results and the progress display are checked, never an accuracy or a timing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quality_quick_writes_json_plot_table_and_progress(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "quality.py"),
            "--quick",
            "--set",
            "privacy.max_grad_norm=3.0",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "quality.json").read_text())
    assert (tmp_path / "quality.png").stat().st_size > 1000
    assert {
        "benchmark",
        "setting",
        "ceiling",
        "floor",
        "floor_per_site",
        "accuracy",
        "runs",
    } <= set(report)
    setting = report["setting"]
    assert setting["quick"] and setting["sites"] == 3 and setting["rounds"] == 2
    assert setting["alpha"] == 0.3 and setting["epsilons"] == [8.0]
    assert setting["max_grad_norm"] == 3.0  # --set reached every configuration's config
    assert len(setting["site_sizes"]) == 3 and setting["test_examples"] > 0
    assert set(report["accuracy"]) == {"fedavg", "ffa", "fedsvd"}
    for by_epsilon in report["accuracy"].values():
        assert set(by_epsilon) == {"8", "no_dp"}
        assert all(0.0 <= a <= 1.0 for a in by_epsilon.values())
    assert 0.0 <= report["ceiling"] <= 1.0 and len(report["floor_per_site"]) == 3
    assert report["floor"] == pytest.approx(sum(report["floor_per_site"]) / 3)
    runs = report["runs"]
    assert len(runs) == 1 + 3 + 3 * 2  # ceiling, three sites alone, three strategies × 2
    for run in runs.values():
        assert {"kind", "strategy", "epsilon_target", "accuracy", "loss", "epsilon_spent"} <= set(
            run
        )
        assert run["rounds_updated"] == 2
        if run["epsilon_target"] is None:
            assert run["epsilon_spent"] is None
        else:
            assert 0 < run["epsilon_spent"] <= run["epsilon_target"] and math.isfinite(run["loss"])
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == len(runs) and progress[-1].startswith("[10/10]")
    assert "ceiling" in proc.stdout and "floor" in proc.stdout  # the closing table


@pytest.mark.parametrize(
    ("value", "message"),
    [("oops", "expected KEY=VALUE"), ("privacy.max_grad_normz=3", "max_grad_normz")],
)
def test_a_bad_set_override_exits_2_before_any_work(
    value: str, message: str, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--set", value]
        + ["--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
