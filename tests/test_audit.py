"""``fedpeft audit`` on the tiny private classifier: sound with DP on, and it has power.

Soundness: with fedpeft's DP-SGD as it is, the audited lower bound stays below the ledger's
claimed ε (claims of 1 and 8, several seeds). Power: each test of the second group breaks
one piece of the mechanism *inside the test* (monkeypatch: no noise, a tenth of the noise,
no clipping) while the ledger still charges and claims ε = 1; the audit must then prove an
ε above the claim. A regression of that kind in ``fedpeft/privacy/dp.py`` fails this file.

Each audit trains the tiny BERT of ``experiment=tiny_private`` (2 rounds × 3 steps, q = 0.125,
site 0 of 3 IID sites of a 240-row CSV: 64 training examples) with 1000 canaries; a few
seconds each. Seeds make every run reproducible.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed

import fedpeft.privacy.dp as dp
from fedpeft.audit import AUDIT_FILE, EXIT_VIOLATION, AuditResult, run_audit
from fedpeft.cli import main
from fedpeft.config import ConfigError
from tests.conftest import tiny_config

pytestmark = pytest.mark.filterwarnings(
    "ignore:Secure RNG turned off:UserWarning",  # see fedpeft.privacy.dp, "Randomness"
    "ignore:Full backward hook is firing:UserWarning",
)

M = 1000  # canaries: perfect guesses on 100 of them would prove ε ≈ 3 here


def _config(cls_csv: Path, epsilon: float, *extra: str) -> Any:
    return tiny_config(
        "classification",
        cls_csv,
        "experiment=tiny_private",
        f"privacy.epsilon={epsilon}",
        *extra,
    )


def _audit(
    cls_csv: Path, tmp_path: Path, *, epsilon: float, seed: int, **kwargs: Any
) -> AuditResult:
    extra = kwargs.pop("overrides", ())
    return run_audit(
        _config(cls_csv, epsilon, *extra),
        canaries=kwargs.pop("canaries", M),
        run_dir=tmp_path / f"audit-{epsilon}-{seed}",
        seed=seed,
        **kwargs,
    )


# ---------------------------------------------------------------- soundness


@pytest.mark.parametrize(
    ("epsilon", "seed"),
    [
        (1.0, 0),
        (8.0, 0),
        pytest.param(1.0, 1, marks=pytest.mark.slow),
        pytest.param(1.0, 2, marks=pytest.mark.slow),
        pytest.param(8.0, 1, marks=pytest.mark.slow),
        pytest.param(8.0, 2, marks=pytest.mark.slow),
    ],
)
def test_dp_on_bound_stays_below_the_claim(
    cls_csv: Path, tmp_path: Path, epsilon: float, seed: int
) -> None:
    result = _audit(cls_csv, tmp_path, epsilon=epsilon, seed=seed)
    assert result.consistent, result.verdict
    assert result.bound.epsilon_lower_bound <= result.claimed_epsilon
    # the claim is the ledger's: calibrated to the target, charged for every step
    assert result.claimed_epsilon == pytest.approx(epsilon, rel=0.02)
    assert result.claimed_epsilon <= epsilon
    assert result.steps == 6 and result.sample_rate == 0.125
    ledger = json.loads((result.run_dir / "ledger" / "site-0.json").read_text())
    assert sum(e["steps"] for e in ledger["entries"]) == 6
    assert result.verdict.startswith("consistent: lower bound ")


# ---------------------------------------------------------------- power


def _no_noise(original: Callable[..., Any]) -> Callable[..., Any]:
    return lambda **kw: original(**{**kw, "noise_multiplier": 0.0})


def _tenth_noise(original: Callable[..., Any]) -> Callable[..., Any]:
    return lambda **kw: original(**{**kw, "noise_multiplier": kw["noise_multiplier"] / 10})


def _unclipped(self: DPOptimizer) -> None:
    """Opacus' clip_and_accumulate with the clip factor left out (the bug simulated)."""
    for p in self.params:
        _check_processed_flag(p.grad_sample)
        grad = self._get_flat_grad_sample(p).to(p.dtype).sum(0)
        p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
        _mark_as_processed(p.grad_sample)


@pytest.mark.parametrize("broken", ["no noise", "noise / 10", "no clipping"])
def test_a_broken_mechanism_is_caught(
    cls_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    if broken == "no noise":
        monkeypatch.setattr(dp, "make_private", _no_noise(dp.make_private))
    elif broken == "noise / 10":
        monkeypatch.setattr(dp, "make_private", _tenth_noise(dp.make_private))
    else:  # noise still σ·C, but per-example gradients are summed unclipped
        monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", _unclipped)
    result = _audit(cls_csv, tmp_path, epsilon=1.0, seed=0)
    assert result.claimed_epsilon <= 1.0  # the ledger still claims the strict setting
    assert not result.consistent, result.verdict
    assert result.bound.epsilon_lower_bound > 2.0 * result.claimed_epsilon
    assert result.verdict.startswith("VIOLATION: lower bound ")


# ---------------------------------------------------------------- other modes and kinds


def test_input_canaries_in_ghost_mode_are_sound(cls_csv: Path, tmp_path: Path) -> None:
    result = _audit(
        cls_csv,
        tmp_path,
        epsilon=8.0,
        seed=0,
        kind="input",
        canaries=200,
        overrides=("privacy.clipping=ghost",),
    )
    assert result.kind == "input" and result.clipping == "ghost"
    assert result.consistent
    assert result.bound.canaries == 200


@pytest.mark.slow
def test_dirac_canaries_in_functorch_mode_catch_missing_noise(
    cls_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dp, "make_private", _no_noise(dp.make_private))
    result = _audit(
        cls_csv, tmp_path, epsilon=1.0, seed=3, overrides=("privacy.clipping=functorch",)
    )
    assert not result.consistent


@pytest.mark.slow
def test_the_same_seed_repeats_the_audit(cls_csv: Path, tmp_path: Path) -> None:
    first = _audit(cls_csv, tmp_path / "a", epsilon=8.0, seed=5)
    second = _audit(cls_csv, tmp_path / "b", epsilon=8.0, seed=5)
    assert first.bound == second.bound


# ---------------------------------------------------------------- refusals


def test_refusals_name_every_option(cls_csv: Path, tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    config = _config(cls_csv, 1.0, "privacy.enabled=false", "privacy.clipping=ghost")
    with pytest.raises(ConfigError) as err:
        run_audit(config, canaries=1, beta=1.5, run_dir=tmp_path / "used")
    message = str(err.value)
    for fragment in (
        "--canaries 1",
        "--beta 1.5",
        "privacy.enabled=false",
        "privacy.clipping=ghost",
        "--out",
    ):
        assert fragment in message
    with pytest.raises(ConfigError, match="--kind 'x'"):
        run_audit(_config(cls_csv, 1.0), kind="x", run_dir=tmp_path / "k")


def test_more_dirac_canaries_than_coordinates_is_refused(cls_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--canaries 100000: .* allowed 2 to \d+"):
        run_audit(_config(cls_csv, 1.0), canaries=100_000, run_dir=tmp_path / "many")


# ---------------------------------------------------------------- the command


def test_cli_writes_audit_json_and_exits_0(
    cls_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    code = main(
        [
            "audit",
            "experiment=tiny_private",
            f"data.path={cls_csv}",
            "--canaries",
            "300",
            "--out",
            str(out),
            "--seed",
            "0",
        ]
    )
    assert code == 0
    report = json.loads((out / AUDIT_FILE).read_text())
    for field in (
        "claimed_epsilon",
        "epsilon_lower_bound",
        "m",
        "k",
        "beta",
        "correct",
        "delta",
        "p_value",
        "verdict",
    ):
        assert field in report
    assert report["m"] == 300 and report["beta"] == 0.05 and report["kind"] == "dirac"
    assert report["verdict"].startswith("consistent")
    assert report["epsilon_lower_bound"] <= report["claimed_epsilon"]
    printed = capsys.readouterr().out
    assert report["verdict"] in printed and "audit.json" in printed


def test_cli_exits_3_on_a_violation(
    cls_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dp, "make_private", _no_noise(dp.make_private))
    argv = ["audit", "experiment=tiny_private", f"data.path={cls_csv}", "privacy.epsilon=1"]
    assert main([*argv, "--out", str(tmp_path / "v"), "--seed", "0"]) == EXIT_VIOLATION
    assert json.loads((tmp_path / "v" / AUDIT_FILE).read_text())["consistent"] is False


def test_cli_bad_setting_exits_2(cls_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["audit", "experiment=tiny_private", f"data.path={cls_csv}", "--beta", "0"]
    assert main(argv) == 2
    assert "--beta 0.0" in capsys.readouterr().err


def test_dirac_canaries_sit_on_lora_and_on_the_biases_only_when_no_lora_trains() -> None:
    import numpy as np
    import torch

    from fedpeft.audit import _DiracCanaries

    def param(n: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.zeros(n))

    lora = ("base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight", 40)
    bias = ("base_model.model.bert.encoder.layer.0.output.dense.bias", 30)
    head = ("base_model.model.classifier.modules_to_save.default.weight", 20)
    for trained, kept in (([lora, bias, head], {0}), ([bias, head], {0})):
        params = [(name, param(n)) for name, n in trained]
        canaries = _DiracCanaries(params, count=25, norm=1.0, rng=np.random.default_rng(0))
        assert set(canaries.param_index.tolist()) == kept  # never the head; biases for BitFit
    with pytest.raises(ConfigError, match="one trained LoRA coordinate \\(or bias\\)"):
        _DiracCanaries([(head[0], param(20))], count=5, norm=1.0, rng=np.random.default_rng(0))
