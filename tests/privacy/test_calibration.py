"""ε from a DP-SGD history and noise calibration, against Opacus' accountants.

Golden values were computed once with Opacus 1.6.0 directly, e.g.::

    acc = opacus.accountants.create_accountant("prv")
    acc.history = [(1.0, 0.01, 1000)]
    acc.get_epsilon(delta=1e-5)  # 1.838371637017295

and are hard-coded to 4 significant digits; each test also cross-checks live.
"""

from __future__ import annotations

import math

import pytest
from opacus.accountants import create_accountant

from fedpeft.privacy.calibration import (
    MAX_NOISE_MULTIPLIER,
    calibrate_noise_multiplier,
    canonical_history,
    compute_epsilon,
)
from fedpeft.privacy.errors import PrivacyConfigError

pytestmark = [
    # RDP notes when its best order is the largest one tried (loose bound at large ε).
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning"),
]

DELTA = 1e-5
SINGLE = [(1.0, 0.01, 1000)]
MIXED = [(1.1, 0.01, 500), (0.8, 0.02, 200), (1.1, 0.01, 300)]

# (history, accountant) -> ε at δ = 1e-5, from Opacus 1.6.0 (full precision in the comment)
GOLDEN_EPSILON = [
    (SINGLE, "prv", 1.838),  # 1.838371637017295
    (SINGLE, "rdp", 2.101),  # 2.1013652716430564
    (MIXED, "prv", 3.511),  # 3.5106822740444006
    (MIXED, "rdp", 4.155),  # 4.155420195305427
]


def _opacus_epsilon(history: list[tuple[float, float, int]], accountant: str) -> float:
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=DELTA))


@pytest.mark.parametrize(("history", "accountant", "golden"), GOLDEN_EPSILON)
def test_epsilon_matches_opacus_golden_and_live(
    history: list[tuple[float, float, int]], accountant: str, golden: float
) -> None:
    epsilon = compute_epsilon(history, delta=DELTA, accountant=accountant)
    assert epsilon == pytest.approx(golden, rel=5e-4)
    # live: the unmerged history fed straight into Opacus (merging changes nothing material)
    assert epsilon == pytest.approx(_opacus_epsilon(history, accountant), rel=1e-8)


def test_history_with_identical_rounds_is_merged() -> None:
    assert canonical_history(MIXED) == [(1.1, 0.01, 800), (0.8, 0.02, 200)]
    assert canonical_history([(1.0, 0.5, 0), (1.0, 0.5, 3)]) == [(1.0, 0.5, 3)]
    # ten rounds of 100 steps cost exactly what calibration computed for 1000 steps
    rounds = [(1.0, 0.01, 100)] * 10
    assert compute_epsilon(rounds, delta=DELTA) == compute_epsilon(SINGLE, delta=DELTA)


def test_trivial_histories() -> None:
    assert compute_epsilon([], delta=DELTA) == 0.0
    assert compute_epsilon([(1.0, 0.1, 0)], delta=DELTA) == 0.0
    assert compute_epsilon([(1.0, 0.1, 10), (0.0, 0.1, 1)], delta=DELTA) == math.inf


@pytest.mark.parametrize(
    ("accountant", "golden_sigma"),
    [("prv", 1.426), ("rdp", 1.523)],  # 1.42578125, 1.5234375 from Opacus' search
)
def test_calibrated_sigma_meets_the_target_closely(accountant: str, golden_sigma: float) -> None:
    target = 1.0
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=DELTA, sample_rate=0.01, steps=1000, accountant=accountant
    )
    assert sigma == pytest.approx(golden_sigma, rel=5e-4)
    epsilon = compute_epsilon([(sigma, 0.01, 1000)], delta=DELTA, accountant=accountant)
    assert target - 0.01 <= epsilon <= target


def test_impossible_target_raises_before_any_training() -> None:
    with pytest.raises(PrivacyConfigError, match="cannot be reached") as info:
        calibrate_noise_multiplier(
            target_epsilon=1e-3, delta=DELTA, sample_rate=1.0, steps=10_000, accountant="rdp"
        )
    assert f"{MAX_NOISE_MULTIPLIER:g}" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_epsilon": 0.0}, "target_epsilon=0.0"),
        ({"target_epsilon": -1.0}, "target_epsilon=-1.0"),
        ({"target_epsilon": math.inf}, "target_epsilon=inf"),
        ({"delta": 0.0}, "delta=0.0"),
        ({"delta": 1.0}, "delta=1.0"),
        ({"sample_rate": 0.0}, r"sample_rate=0.0 must be in \(0, 1\]"),
        ({"sample_rate": 1.5}, "sample_rate=1.5"),
        ({"steps": 0}, "steps=0 must be an integer >= 1"),
        ({"steps": 2.5}, "steps=2.5"),
        ({"accountant": "gdp"}, "accountant='gdp' is not supported"),
        ({"epsilon_tolerance": 5.0}, "epsilon_tolerance=5.0"),
    ],
)
def test_invalid_calibration_arguments_are_named(kwargs: dict[str, object], match: str) -> None:
    arguments: dict[str, object] = {
        "target_epsilon": 2.0,
        "delta": DELTA,
        "sample_rate": 0.01,
        "steps": 100,
        "accountant": "rdp",
    }
    arguments.update(kwargs)
    with pytest.raises(PrivacyConfigError, match=match):
        calibrate_noise_multiplier(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("history", "match"),
    [
        ([(1.0, 0.01)], "must be \\(noise_multiplier, sample_rate, steps\\)"),
        ([(-1.0, 0.01, 5)], "noise_multiplier=-1.0"),
        ([(math.nan, 0.01, 5)], "noise_multiplier=nan"),
        ([(1.0, 0.0, 5)], "sample_rate=0.0"),
        ([(1.0, 0.01, -5)], "steps=-5"),
    ],
)
def test_invalid_history_is_named(history: list[tuple[float, ...]], match: str) -> None:
    with pytest.raises(PrivacyConfigError, match=match):
        compute_epsilon(history, delta=DELTA)  # type: ignore[arg-type]


def test_invalid_delta_and_accountant_for_epsilon() -> None:
    with pytest.raises(PrivacyConfigError, match="delta=1.5"):
        compute_epsilon(SINGLE, delta=1.5)
    with pytest.raises(PrivacyConfigError, match="accountant='gdp'"):
        compute_epsilon(SINGLE, delta=DELTA, accountant="gdp")
