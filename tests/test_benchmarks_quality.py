"""``benchmarks/quality.py --quick`` runs as a user would run it and writes the expected JSON.

Its own process, into a temporary folder (never ``benchmarks/results``); only the shape of the
results and the progress display are checked, never an accuracy or a timing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from peft.tuners.lora import LoraLayer

from fedpeft.config import LoraSettings, ModelConfig
from fedpeft.model import build_model, get_flat, set_flat, split_flat

ROOT = Path(__file__).resolve().parent.parent


def load_quality():  # type: ignore[no-untyped-def]
    """``benchmarks/quality.py`` as a module (benchmarks is not a package)."""
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_without_lora_zeroes_every_delta_weight_and_keeps_the_rest() -> None:
    quality = load_quality()
    loaded = build_model(
        ModelConfig(loader="tiny-bert", task="classification", max_length=32),
        LoraSettings(r=4, target_modules=["query", "value"]),
        seed=0,
    )
    layout = loaded.layout
    flat = np.random.default_rng(0).standard_normal(layout.size).astype(np.float32)
    layers = [m for m in loaded.peft_model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 4  # query and value in each of the tiny model's 2 layers

    set_flat(loaded.peft_model, layout, flat)
    assert all(float(m.get_delta_weight("default").detach().abs().max()) > 0 for m in layers)

    original = flat.copy()
    stripped = quality.without_lora(flat, layout)
    assert np.array_equal(flat, original)  # a copy: the run's adapter is not modified
    set_flat(loaded.peft_model, layout, stripped)
    assert all(float(m.get_delta_weight("default").detach().abs().max()) == 0 for m in layers)
    assert np.array_equal(get_flat(loaded.peft_model, layout), stripped)
    before, after = split_flat(flat, layout), split_flat(stripped, layout)
    for name in layout.names:  # lora_A and the classifier head are untouched
        if ".lora_B." in name:
            assert not after[name].any()
        else:
            assert np.array_equal(after[name], before[name]), name
    assert any(".modules_to_save." in n for n in layout.names)


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
    assert set(report["lora_gain"]) == {"fedavg", "ffa", "fedsvd"}
    for by_epsilon in report["lora_gain"].values():
        assert set(by_epsilon) == {"8", "no_dp"}
    runs = report["runs"]
    for run in runs.values():
        assert 0.0 <= run["accuracy_without_lora"] <= 1.0
        if run["kind"] == "federated":
            key = "no_dp" if run["epsilon_target"] is None else f"{run['epsilon_target']:g}"
            gain = run["accuracy"] - run["accuracy_without_lora"]
            assert report["lora_gain"][run["strategy"]][key] == pytest.approx(gain, abs=1e-4)
    ceiling = runs["ceiling"]
    assert report["ceiling_lora_gain"] == pytest.approx(
        ceiling["accuracy"] - ceiling["accuracy_without_lora"], abs=1e-4
    )
    assert "what the LoRA update adds" in proc.stdout
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
