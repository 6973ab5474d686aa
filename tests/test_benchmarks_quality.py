"""``benchmarks.quality --quick`` runs as a user would run it and writes the expected JSON.

Its own process, into a temporary folder (never ``benchmarks/results``); only the shape of the
results and the progress display are checked, never an accuracy or a timing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from peft.tuners.lora import LoraLayer

from benchmarks import quality
from benchmarks.report import write_report
from fedpeft.config import LoraSettings, ModelConfig
from fedpeft.model import build_model, get_flat, set_flat, split_flat

ROOT = Path(__file__).resolve().parent.parent


def test_without_lora_zeroes_every_delta_weight_and_keeps_the_rest() -> None:
    loaded = build_model(
        ModelConfig(loader="tiny_bert", task="classification", max_length=32),
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
            "-m",
            "benchmarks.quality",
            "--quick",
            "--seeds",
            "2",
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
    assert report["floor"] == pytest.approx(sum(report["floor_per_site"]) / 3, abs=1e-4)
    seeds = report["seeds"]
    assert len(seeds) == 2 and seeds[1] == seeds[0] + 1
    assert report["ceiling"] == pytest.approx(np.mean(report["ceiling_per_seed"]), abs=1e-4)
    per_seed = report["accuracy_per_seed"]
    for strategy, by_epsilon in report["accuracy"].items():
        for eps, value in by_epsilon.items():
            assert len(per_seed[strategy][eps]) == 2
            assert value == pytest.approx(np.mean(per_seed[strategy][eps]), abs=1e-4)
    assert set(report["vs_fedavg"]) == {"ffa", "fedsvd"}  # paired differences, one per seed
    for strategy, by_epsilon in report["vs_fedavg"].items():
        for eps, differences in by_epsilon.items():
            expected = np.subtract(per_seed[strategy][eps], per_seed["fedavg"][eps])
            assert differences == pytest.approx(expected.tolist())
    probe = report["probe"]
    assert 0.0 <= probe["accuracy"] <= 1.0 and probe["features"] == 32  # tiny BERT's width
    # the L2 weight with the best validation accuracy (ties: the stronger penalty)
    validation = {float(l2): acc for l2, acc in probe["validation_accuracy"].items()}
    assert probe["l2"] == max(validation, key=lambda l2: (validation[l2], l2))
    assert set(report["lora_gain"]) == {"fedavg", "ffa", "fedsvd"}
    for by_epsilon in report["lora_gain"].values():
        assert set(by_epsilon) == {"8", "no_dp"}
    runs = report["runs"]
    gains: dict[tuple[str, str], list[float]] = {}
    for run in runs.values():
        assert 0.0 <= run["accuracy_without_lora"] <= 1.0
        if run["kind"] == "federated":
            key = "no_dp" if run["epsilon_target"] is None else f"{run['epsilon_target']:g}"
            gain = run["accuracy"] - run["accuracy_without_lora"]
            gains.setdefault((run["strategy"], key), []).append(gain)
    for (strategy, key), values in gains.items():
        assert report["lora_gain"][strategy][key] == pytest.approx(np.mean(values), abs=1e-4)
    ceilings = [runs[f"ceiling@{seed}"] for seed in seeds]
    assert report["ceiling_lora_gain"] == pytest.approx(
        np.mean([c["accuracy"] - c["accuracy_without_lora"] for c in ceilings]), abs=1e-4
    )
    assert "what the LoRA update adds" in proc.stdout
    assert len(runs) == 2 * (1 + 3 + 3 * 2)  # per seed: ceiling, 3 sites alone, 3 strategies × 2
    for run in runs.values():
        assert {"kind", "strategy", "epsilon_target", "accuracy", "loss", "epsilon_spent"} <= set(
            run
        )
        assert run["seed"] in seeds
        assert run["rounds_updated"] == 2
        if run["epsilon_target"] is None:
            assert run["epsilon_spent"] is None
        else:
            assert 0 < run["epsilon_spent"] <= run["epsilon_target"] and math.isfinite(run["loss"])
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(progress) == len(runs) and progress[-1].startswith("[20/20]")
    assert "ceiling" in proc.stdout and "floor" in proc.stdout  # the closing table
    assert "linear probe: accuracy" in proc.stdout and "paired by seed" in proc.stdout
    section = "\n".join(quality.section(report, tmp_path, tmp_path / "README.md"))
    assert f"| probe (head on frozen encoder) | {probe['accuracy']:.3f} |" in section
    for strategy, by_epsilon in report["vs_fedavg"].items():  # the paired table, ε=8 column
        wins = sum(d > 0 for d in by_epsilon["8"])
        assert f"| {strategy} | {np.mean(by_epsilon['8']):+.3f} ({wins}/2) |" in section


@pytest.mark.parametrize(
    ("value", "message"),
    [("oops", "expected KEY=VALUE"), ("privacy.max_grad_normz=3", "max_grad_normz")],
)
def test_a_bad_set_override_exits_2_before_any_work(
    value: str, message: str, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", "--quick", "--set", value]
        + ["--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_head_inputs_are_what_the_head_reads() -> None:
    """The captured features, put through the trained head, give the model's own logits."""
    import datasets
    import torch

    from fedpeft.client.train import forward_losses, make_loader
    from fedpeft.config import compose_config
    from fedpeft.data import tokenize

    config = compose_config(["model=tiny_bert"])
    loaded = build_model(config.model, config.lora, seed=0)
    texts = ["a fine film", "dull", "the plot goes nowhere at all", "yes", "moving and sharp"]
    table = datasets.Dataset.from_dict({"text": texts, "label": [1, 0, 0, 1, 1]})
    features, labels = quality.head_inputs(loaded, table, config)
    assert features.shape == (5, config.model.hidden_size) and labels.tolist() == [1, 0, 0, 1, 1]

    head = next(
        m for n, m in loaded.peft_model.named_modules() if n.endswith("modules_to_save.default")
    )
    dataset = tokenize(
        table,
        loaded.tokenizer,
        config=config.data,
        task="classification",
        max_length=config.model.max_length,
    )
    batch = next(
        iter(
            make_loader(
                dataset,
                batch_size=8,
                pad_id=int(loaded.tokenizer.pad_token_id),
                shuffle=False,
                seed=0,
            )
        )
    )
    with torch.no_grad():
        _, logits = forward_losses(loaded, loaded.peft_model, batch, torch.device("cpu"))
        assert torch.allclose(head(features), logits, atol=1e-6)


def test_fit_head_separates_separable_data_and_l2_shrinks_it() -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g)
    y = (x[:, 0] - 0.5 * x[:, 3] > 0).long()  # linearly separable through the origin
    weight, bias = quality.fit_head(x, y, num_labels=2, l2=0.0)
    assert weight.shape == (6, 2) and bias.shape == (2,)
    assert bool(((x @ weight + bias).argmax(dim=1) == y).all())
    norms = [
        float(quality.fit_head(x, y, num_labels=2, l2=l2)[0].norm()) for l2 in (1e-3, 1e-2, 1e-1)
    ]
    assert norms[0] > norms[1] > norms[2] > 0  # a stronger penalty, a smaller head


def test_paired_secret_is_a_fixed_32_byte_key_per_seed_and_site() -> None:
    keys = {(seed, site): quality.paired_secret(seed, site) for seed in (0, 1) for site in (0, 1)}
    assert all(len(k) == 32 for k in keys.values())  # fedpeft.client.budget.SECRET_BYTES
    assert len(set(keys.values())) == 4  # every seed and site its own stream
    assert quality.paired_secret(1, 0) == keys[(1, 0)]  # the same in every run of the seed


def test_report_shows_every_named_quality_sweep_after_the_default(tmp_path: Path) -> None:
    def sweep(rounds: int, ffa: float) -> dict[str, object]:
        setting = {"model": "minilm", "dataset": "rotten_tomatoes", "sites": 10, "alpha": 0.3}
        return {
            "setting": {**setting, "rounds": rounds, "local_steps": 5, "epsilons": [8.0]},
            "accuracy": {"ffa": {"8": ffa, "no_dp": 0.75}},
            "ceiling": 0.8,
            "floor": 0.6,
        }

    results = tmp_path / "results"
    results.mkdir()
    (results / "quality_long.json").write_text(json.dumps(sweep(6, 0.714)))
    (results / "quality.json").write_text(json.dumps(sweep(3, 0.657)))
    write_report(results, tmp_path / "README.md")
    text = (tmp_path / "README.md").read_text()
    default = text.index("## Quality (`quality.py`)")
    named = text.index("## Quality, 6 rounds × 5 steps (`quality.py --name quality_long`)")
    assert default < named
    assert "| ffa | 0.657 | 0.750 |" in text[default:named]
    assert "| ffa | 0.714 | 0.750 |" in text[named:]


def test_a_bad_name_exits_2_before_any_work(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", "--quick", "--name", "../x"]
        + ["--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "--name '../x'" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
