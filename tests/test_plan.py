"""``fedpeft plan``: each site's DP-SGD before training, and whether its noise leaves LoRA
anything to learn (fedpeft.plan): figures against a hand computation, the verdict flipping
where ρ = σ·√d / (q·N) crosses 1, the command and the warning ``fedpeft simulate`` gives."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from fedpeft.cli import main
from fedpeft.config import compose_config
from fedpeft.plan import (
    best_sample_rate,
    noise_to_signal,
    plan_site,
    trained_coordinates,
    warnings_for,
)
from fedpeft.privacy.calibration import calibrate_noise_multiplier, compute_epsilon


def _config(csv: Path, *overrides: str):  # type: ignore[no-untyped-def]
    return compose_config(["experiment=tiny_private", f"data.path={csv}", *overrides])


def test_noise_to_signal_is_sigma_root_d_over_the_expected_batch() -> None:
    # σ = 0.5, q = 0.05, N = 400: expected batch 20; d = 10,000: √d = 100
    assert noise_to_signal(sigma=0.5, sample_rate=0.05, num_train=400, coordinates=10_000) == 2.5
    assert noise_to_signal(sigma=0.5, sample_rate=0.05, num_train=400, coordinates=0) == 0.0


def test_the_trained_coordinates_are_counted_by_strategy(cls_csv: Path) -> None:
    # tiny BERT: hidden 32, 2 layers, LoRA r = 8 on query and value; head 2×32 + 2
    ffa = trained_coordinates(_config(cls_csv, "strategy=ffa"))
    fedavg = trained_coordinates(_config(cls_csv, "strategy=fedavg"))
    assert ffa == {"LoRA": 2 * 2 * 32 * 8, "bias": 0, "head": 66}  # B only: A stays at its start
    assert fedavg == {"LoRA": 2 * 2 * (32 * 8 + 8 * 32), "bias": 0, "head": 66}


def test_biases_are_counted_apart_and_only_in_rounds_that_train_them(cls_csv: Path) -> None:
    # tiny BERT's biases: embeddings' LayerNorm 32; per layer query, key, value, attention
    # output, its LayerNorm, output, its LayerNorm (32 each) and intermediate (64); pooler 32
    every = 32 + 2 * (7 * 32 + 64) + 32
    bitfit = trained_coordinates(_config(cls_csv, "lora.bias=all", "train.trainable=[bias]"))
    assert bitfit == {"LoRA": 0, "bias": every, "head": 66}
    both = trained_coordinates(_config(cls_csv, "lora.bias=all", "train.trainable=[bias,lora]"))
    assert both == {"LoRA": 2 * 2 * (32 * 8 + 8 * 32), "bias": every, "head": 66}
    adapted = trained_coordinates(_config(cls_csv, "lora.bias=lora_only"))
    assert adapted["bias"] == 2 * 2 * 32  # query and value of 2 layers
    probe = trained_coordinates(_config(cls_csv, "lora.bias=all", "train.trainable=[head,head]"))
    assert probe == {"LoRA": 0, "bias": 0, "head": 66}
    # the verdict rates the biases when LoRA does not train: ρ = 0.5·√640 / (0.05·N)
    config = _config(cls_csv, "privacy.noise_multiplier=0.5", "privacy.sample_rate=0.05")
    small = plan_site(config, site="s", num_train=100, coordinates=bitfit)
    rho = 0.5 * math.sqrt(every) / (0.05 * 100)
    assert {g.name: g.noise_to_signal for g in small.groups}["bias"] == pytest.approx(rho)
    assert rho > 1 and "the biases will not learn" in small.verdict()
    large = plan_site(config, site="s", num_train=1000, coordinates=bitfit)
    assert warnings_for([large]) == []
    (warning,) = warnings_for([large, small])
    assert warning.startswith("1 of 2 site(s) train the biases under more DP noise")
    assert large.verdict().endswith(
        f"the biases' {every:,} coordinates can learn (noise "
        f"{0.5 * math.sqrt(every) / 50:.2g}× the largest per-coordinate signal)"
    )


def test_the_verdict_flips_where_the_formula_says(cls_csv: Path) -> None:
    # σ fixed at 0.5, q = 0.05, d = 10,000: ρ = 0.5·100 / (0.05·N) = 1000 / N, 1 at N = 1000
    config = _config(cls_csv, "privacy.noise_multiplier=0.5", "privacy.sample_rate=0.05")
    coordinates = {"LoRA": 10_000, "head": 100}
    below = plan_site(config, site="s", num_train=999, coordinates=coordinates)
    at = plan_site(config, site="s", num_train=1000, coordinates=coordinates)
    lora = {g.name: g for g in below.groups}["LoRA"]
    assert lora.noise_to_signal == pytest.approx(1000 / 999) and not lora.learns
    assert "LoRA will not learn" in below.verdict() and "d = 10,000" in below.verdict()
    assert "~1× any per-coordinate signal" in below.verdict()
    assert {g.name: g for g in at.groups}["LoRA"].learns
    assert "LoRA's 10,000 coordinates can learn" in at.verdict()
    # the head's 100 coordinates: ρ = 0.5·10 / 50 = 0.1 at N = 1000
    assert {g.name: g for g in at.groups}["head"].noise_to_signal == pytest.approx(0.1)
    assert "the head's 100 can (0.1×)" in below.verdict()
    assert at.expected_batch == pytest.approx(50.0)
    assert warnings_for([at]) == []
    (warning,) = warnings_for([at, below])
    assert warning.startswith("1 of 2 site(s) train LoRA") and "at N = 999" in warning


def test_epsilon_after_each_round_is_the_accountants_and_the_last_meets_the_target(
    cls_csv: Path,
) -> None:
    config = _config(cls_csv, "privacy.delta=1e-5", "federation.rounds=3", "train.local_steps=4")
    plan = plan_site(config, site="s", num_train=64, coordinates={"LoRA": 1024, "head": 66})
    sigma = calibrate_noise_multiplier(
        target_epsilon=8.0, delta=1e-5, sample_rate=0.125, steps=12, accountant="prv"
    )
    assert plan.noise_multiplier == pytest.approx(sigma)
    assert plan.sample_rate == 0.125 and plan.steps_per_round == 4 and plan.delta == 1e-5
    expected = [compute_epsilon([(sigma, 0.125, 4 * r)], delta=1e-5) for r in (1, 2, 3)]
    assert plan.epsilons == pytest.approx(expected)
    assert plan.epsilons[0] < plan.epsilons[1] < plan.epsilons[2] <= 8.0
    assert plan.epsilons[2] == pytest.approx(8.0, abs=0.02)


def test_the_recommended_rate_has_the_smallest_sigma_over_q(cls_csv: Path) -> None:
    config = _config(cls_csv, "privacy.delta=1e-5", "privacy.accountant=rdp")
    rates = (0.02, 0.1, 0.5)
    best = best_sample_rate(config, rates=rates)
    assert best is not None
    q, sigma = best
    steps = config.federation.rounds * config.train.local_steps
    by_hand = {
        r: calibrate_noise_multiplier(
            target_epsilon=8.0, delta=1e-5, sample_rate=r, steps=steps, accountant="rdp"
        )
        for r in rates
    }
    assert q == min(rates, key=lambda r: by_hand[r] / r)
    assert sigma == pytest.approx(by_hand[q])


def test_the_command_prints_every_site_and_a_verdict(
    cls_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["plan", "experiment=tiny_private", f"data.path={cls_csv}", "privacy.accountant=rdp"]
    assert main([*args, "--site-examples", "40,100000"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("DP-SGD plan: ε = 8 per site over 2 round(s) of 3 step(s)")
    assert lines[3].split()[:5] == ["site", "0", "40", "0.125", "5.0"]  # N, q, q·N
    assert lines[4].split()[:5] == ["site", "1", "100,000", "0.125", "12500.0"]
    assert "site 0: at N = 40 and q = 0.125 and d = 2,048" in out  # fedavg: A and B
    assert "LoRA will not learn" in out
    assert "site 1: at N = 100,000 and q = 0.125: LoRA's 2,048 coordinates can learn" in out
    assert "privacy.sample_rate=" in lines[-1]
    # the rate is the same at every site, so σ is too: one calibration, one value in the table
    assert len({line.split()[6] for line in lines[3:5]}) == 1


def test_the_command_refuses_bad_sizes_and_a_run_without_dp(
    cls_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["plan", "experiment=tiny_private", f"data.path={cls_csv}"]
    assert main([*base, "--site-examples", "40,many"]) == 2
    assert "--site-examples '40,many': give each site's number" in capsys.readouterr().err
    assert main([*base, "--site-examples", "0"]) == 2
    assert main([*base, "privacy.enabled=false"]) == 2
    assert "privacy.enabled=false: without DP-SGD there is no noise" in capsys.readouterr().err


def test_without_sizes_the_simulations_own_sites_are_planned(
    cls_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", "experiment=tiny_private", f"data.path={cls_csv}"]) == 0
    out = capsys.readouterr().out
    sites = [line for line in out.splitlines() if re.match(r"site \d+ ", line)]
    assert [line.split()[0] + line.split()[1] for line in sites] == ["site0", "site1", "site2"]
    # the tiny partitions of ~64 examples at q = 0.125: 8 per step, far too few for the 2,048
    # LoRA coordinates fedavg trains: ρ = σ·√2048 / (0.125·N)
    for line in sites:
        sigma, rho = float(line.split()[6]), float(line.split()[-2])
        n = int(line.split()[2].replace(",", ""))
        assert rho == pytest.approx(sigma * math.sqrt(2048) / (0.125 * n), rel=0.01)
        assert rho > 1


def test_no_rate_is_recommended_when_sigma_is_fixed(
    cls_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(cls_csv, "privacy.noise_multiplier=0.8")
    assert best_sample_rate(config) is None
    args = [
        "plan",
        "experiment=tiny_private",
        f"data.path={cls_csv}",
        "privacy.noise_multiplier=0.8",
    ]
    assert main([*args, "--site-examples", "500"]) == 0
    out = capsys.readouterr().out
    assert "privacy.noise_multiplier fixes σ" in out.splitlines()[-1]
    assert " 0.800 " in out  # the table shows the fixed σ
