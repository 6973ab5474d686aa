"""The one-run audit's bound (fedpeft.privacy.audit): known answers, properties, validity.

Where each expected number comes from:

- the paper's own algorithm: Steinke, Nasr and Jagielski, "Privacy Auditing with One (1)
  Training Run" (NeurIPS 2023, arXiv:2305.08846), Appendix D, transcribed below as
  ``_appendix_d_*`` (the same dozen lines appear, with the same names, in public ports of it,
  e.g. ubc-systopia/panoramia-privacy-measurement ``O1_Steinke_Code/o1_audit.py``; Google
  DeepMind's ``jax_privacy/auditing.py`` ``_one_run_p_value`` computes the same p-value);
- published outputs of that algorithm: the audit reports of codedp-ase26/codedp-cpt-models
  on Hugging Face (``starcoder2-7b/dp8/audit_results.json`` and ``dp3/audit_results.json``:
  500 canaries, δ = 1e-5, 95% confidence);
- hand computation from binomial tails for pure ε-DP (δ = 0), in each test's comment.

The paper's figures of the bound achievable with perfect guesses could not be read from the
sources available here, so no number is taken from them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import binom

from fedpeft.privacy.audit import (
    AuditBound,
    audit_bound,
    correct_guesses,
    epsilon_lower_bound,
    guess_grid,
    p_value,
)
from fedpeft.privacy.errors import PrivacyConfigError

# ---------------------------------------------------------------- the paper's Appendix D


def _appendix_d_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Appendix D ``p_value_DP_audit``, line for line."""
    q = 1 / (1 + math.exp(-eps))
    beta = binom.sf(v - 1, r, q)
    alpha = 0.0
    total = 0.0
    for i in range(1, v + 1):
        total = total + binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return float(min(beta + alpha * delta * 2 * m, 1))


def _appendix_d_eps(m: int, r: int, v: int, delta: float, p: float) -> float:
    """Appendix D ``get_eps_audit``, line for line (30 bisection steps)."""
    eps_min, eps_max = 0.0, 1.0
    while _appendix_d_p_value(m, r, v, eps_max, delta) < p:
        eps_max = eps_max + 1
    for _ in range(30):
        eps = (eps_min + eps_max) / 2
        if _appendix_d_p_value(m, r, v, eps, delta) < p:
            eps_min = eps
        else:
            eps_max = eps
    return eps_min


CASES = [  # (m, r, v, delta, beta)
    (500, 35, 23, 1e-5, 0.05),
    (500, 100, 60, 1e-5, 0.05),
    (1000, 100, 100, 1e-5, 0.05),
    (1000, 600, 600, 1e-5, 0.05),
    (10_000, 1000, 900, 1e-5, 0.05),
    (1000, 200, 150, 1e-5, 0.01),
    (100, 10, 10, 0.0, 0.05),
    (2000, 458, 300, 1e-3, 0.1),
]


@pytest.mark.parametrize(("m", "r", "v", "delta", "beta"), CASES)
def test_p_value_is_appendix_d(m: int, r: int, v: int, delta: float, beta: float) -> None:
    for eps in (0.0, 0.3, 1.0, 2.5, 6.0):
        ours = p_value(canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta)
        assert ours == pytest.approx(_appendix_d_p_value(m, r, v, eps, delta), rel=1e-10, abs=1e-15)


@pytest.mark.parametrize(("m", "r", "v", "delta", "beta"), CASES)
def test_bound_is_appendix_d(m: int, r: int, v: int, delta: float, beta: float) -> None:
    ours = epsilon_lower_bound(canaries=m, guesses=r, correct=v, delta=delta, beta=beta)
    reference = _appendix_d_eps(m, r, v, delta, beta)
    # Appendix D stops after 30 halvings of a bracket <= 7 wide (error <= 7e-9) and, like
    # this module, returns the lower end, where the claim is still rejected.
    assert ours == pytest.approx(reference, abs=1e-8)
    assert p_value(canaries=m, guesses=r, correct=v, epsilon=ours, delta=delta) < beta


@pytest.mark.parametrize(
    ("r", "v", "published"),
    [
        # codedp-ase26/codedp-cpt-models, starcoder2-7b/dp8/audit_results.json, "loss", 0.05:
        # "num_guesses": 35, "correct_guesses": 23, "epsilon": 0.014548719860613346
        (35, 23, 0.014548719860613346),
        # the same, dp3/audit_results.json: 100 guesses, 60 correct, 0.05073561053723097
        (100, 60, 0.05073561053723097),
    ],
)
def test_published_outputs_of_the_reference(r: int, v: int, published: float) -> None:
    # both reports: "num_canaries": 500, "delta": 1e-05, confidence 0.95
    ours = epsilon_lower_bound(canaries=500, guesses=r, correct=v, delta=1e-5, beta=0.05)
    assert ours == pytest.approx(published, abs=1e-8)


# ---------------------------------------------------------------- pure ε (δ = 0) by hand


@pytest.mark.parametrize(
    ("r", "expected"),
    [
        # all r guesses right: P[Bin(r, q) >= r] = q^r = β, so q = β^(1/r), ε = ln(q / (1 - q)).
        # r = 5:  q = 0.05^0.2 = 0.549280, ε = ln(0.549280 / 0.450720) = 0.197763
        (5, 0.19776),
        # r = 10: q = 0.05^0.1 = 0.741134, ε = ln(0.741134 / 0.258866) = 1.051873
        (10, 1.05187),
        # r = 100: q = 0.05^0.01 = 0.970487, ε = ln(0.970487 / 0.029513) = 3.492965
        (100, 3.49297),
    ],
)
def test_perfect_guesses_pure_dp_by_hand(r: int, expected: float) -> None:
    q = 0.05 ** (1 / r)
    assert math.log(q / (1 - q)) == pytest.approx(expected, abs=1e-5)
    bound = epsilon_lower_bound(canaries=1000, guesses=r, correct=r, delta=0.0, beta=0.05)
    assert bound == pytest.approx(math.log(q / (1 - q)), abs=1e-9)


def test_one_wrong_guess_pure_dp_by_hand() -> None:
    # v = r - 1 of r = 20: P[Bin >= 19] = q^20 + 20 q^19 (1 - q) = 0.05, solved for q directly.
    q = brentq(lambda x: x**20 + 20 * x**19 * (1 - x) - 0.05, 0.5, 1 - 1e-12)
    bound = epsilon_lower_bound(canaries=100, guesses=20, correct=19, delta=0.0, beta=0.05)
    assert bound == pytest.approx(math.log(q / (1 - q)), abs=1e-9)


def test_a_single_guess_proves_nothing_at_95_percent() -> None:
    # r = v = 1: q = 0.05 < 1/2 would be needed, i.e. ε < 0: the bound is 0.
    assert epsilon_lower_bound(canaries=10, guesses=1, correct=1, delta=0.0, beta=0.05) == 0.0


# ---------------------------------------------------------------- properties


@pytest.mark.parametrize(("m", "r"), [(100, 20), (1000, 200), (1000, 1000), (5000, 600)])
@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_chance_accuracy_gives_zero(m: int, r: int, delta: float) -> None:
    # half right (or fewer): an ε = 0 mechanism does that half the time, so nothing is rejected
    for v in (0, r // 4, r // 2):
        assert epsilon_lower_bound(canaries=m, guesses=r, correct=v, delta=delta) == 0.0


def test_monotone_in_correct_guesses() -> None:
    m, r = 1000, 200
    bounds = [
        epsilon_lower_bound(canaries=m, guesses=r, correct=v, delta=1e-5) for v in range(r + 1)
    ]
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:], strict=False))
    assert bounds[0] == 0.0 and bounds[-1] > 2.0


def test_monotone_in_beta_and_delta() -> None:
    m, r, v = 1000, 300, 240
    by_beta = [
        epsilon_lower_bound(canaries=m, guesses=r, correct=v, delta=1e-5, beta=b)
        for b in (0.001, 0.01, 0.05, 0.1, 0.3)
    ]
    assert all(b2 >= b1 for b1, b2 in zip(by_beta, by_beta[1:], strict=False))  # less confident
    by_delta = [
        epsilon_lower_bound(canaries=m, guesses=r, correct=v, delta=d)
        for d in (0.0, 1e-6, 1e-5, 1e-4, 1e-3)
    ]
    assert all(b2 <= b1 for b1, b2 in zip(by_delta, by_delta[1:], strict=False))  # weaker claim


def test_p_value_grows_with_epsilon() -> None:
    values = [
        p_value(canaries=1000, guesses=300, correct=240, epsilon=e, delta=1e-5)
        for e in np.linspace(0, 5, 51)
    ]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))


def test_delta_term_uses_all_canaries() -> None:
    # δ enters as 2 m δ: more canaries (same guesses) weaken the bound when δ > 0 only.
    few = epsilon_lower_bound(canaries=1000, guesses=100, correct=100, delta=1e-5)
    many = epsilon_lower_bound(canaries=100_000, guesses=100, correct=100, delta=1e-5)
    assert many < few
    pure = [
        epsilon_lower_bound(canaries=m, guesses=100, correct=100, delta=0.0)
        for m in (1000, 100_000)
    ]
    assert pure[0] == pure[1]


# ---------------------------------------------------------------- guesses and the grid


def test_correct_guesses_by_hand() -> None:
    scores = [0.1, 0.9, 0.5, 0.3, 0.7]
    included = np.array([False, True, True, False, False])
    # top 2 (0.9 in, 0.7 out) -> 1 right; bottom 1 (0.1 out) -> right
    assert correct_guesses(scores, included, k_plus=2, k_minus=1) == 2
    assert correct_guesses(scores, included, k_plus=0, k_minus=2) == 2  # 0.1, 0.3 both out
    assert correct_guesses(scores, included, k_plus=5, k_minus=0) == 2


def test_grid_is_fixed_by_m_and_fits() -> None:
    grid = guess_grid(1000)
    assert grid == guess_grid(1000)
    assert len(grid) == 12
    assert all(kp + km <= 1000 and kp >= 1 for kp, km in grid)
    assert (500, 500) in grid and (10, 0) in grid
    assert all(kp + km <= 3 for kp, km in guess_grid(3))


def test_audit_bound_is_the_bonferroni_maximum() -> None:
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    scores = included * 1.0 + rng.normal(0, 0.8, 1000)
    result = audit_bound(scores, included, delta=1e-5, beta=0.05, claimed_epsilon=1.0)
    assert isinstance(result, AuditBound)
    grid = guess_grid(1000)
    each = [
        epsilon_lower_bound(
            canaries=1000,
            guesses=kp + km,
            correct=correct_guesses(scores, included, k_plus=kp, k_minus=km),
            delta=1e-5,
            beta=0.05 / len(grid),
        )
        for kp, km in grid
    ]
    assert result.epsilon_lower_bound == max(each)
    assert result.candidates == len(grid)
    assert result.included == int(included.sum())
    assert result.correct == correct_guesses(
        scores, included, k_plus=result.k_plus, k_minus=result.k_minus
    )
    # one fixed candidate: no correction at all
    single = audit_bound(scores, included, delta=1e-5, grid=[(100, 100)])
    v = correct_guesses(scores, included, k_plus=100, k_minus=100)
    assert single.epsilon_lower_bound == epsilon_lower_bound(
        canaries=1000, guesses=200, correct=v, delta=1e-5
    )


def test_perfect_scores_violate_a_small_claim_and_noise_does_not() -> None:
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    perfect = audit_bound(included * 1.0, included, delta=1e-5, claimed_epsilon=1.0)
    assert perfect.violation and perfect.epsilon_lower_bound > 3.0
    noise = audit_bound(rng.normal(size=1000), included, delta=1e-5, claimed_epsilon=0.0)
    assert not noise.violation and noise.epsilon_lower_bound < 0.3


def test_validity_on_randomised_response() -> None:
    """The worst case of the theorem: canary outputs are ε-randomised response of S itself.

    Each canary's score is S_i kept with probability e^ε / (1 + e^ε), flipped otherwise (plus a
    tie-breaking jitter independent of S). This mechanism is exactly ε-DP, so over independent
    trials the claim ε is rejected in at most a β fraction of them.
    """
    rng = np.random.default_rng(2)
    eps, trials, m, beta = 1.0, 200, 400, 0.05
    keep = 1 / (1 + math.exp(-eps))
    rejected = 0
    best = 0.0
    for _ in range(trials):
        included = rng.random(m) < 0.5
        released = np.where(rng.random(m) < keep, included, ~included)
        scores = released + rng.uniform(0, 0.5, m)
        result = audit_bound(scores, included, delta=0.0, beta=beta, claimed_epsilon=eps)
        rejected += result.violation
        best = max(best, result.epsilon_lower_bound)
    # binomial(200, 0.05) exceeds 20 with probability < 1e-3
    assert rejected <= 20
    assert best > 0.3  # the audit does see the signal: it is not vacuous


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"canaries": 10, "guesses": 5, "correct": 6, "delta": 0.0}, "correct <= guesses"),
        ({"canaries": 10, "guesses": 11, "correct": 1, "delta": 0.0}, "guesses <= canaries"),
        ({"canaries": 0, "guesses": 0, "correct": 0, "delta": 0.0}, "canaries=0"),
        ({"canaries": 10, "guesses": 5, "correct": 3, "delta": 2.0}, "delta=2.0"),
        ({"canaries": 10, "guesses": 5, "correct": 3, "delta": 0.0, "beta": 0.0}, "beta=0.0"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, float], fragment: str) -> None:
    with pytest.raises(PrivacyConfigError, match=fragment):
        epsilon_lower_bound(**kwargs)  # type: ignore[arg-type]


def test_bad_scores_are_named() -> None:
    with pytest.raises(PrivacyConfigError, match="same non-zero length"):
        audit_bound([1.0, 2.0], np.array([True]), delta=0.0)
    with pytest.raises(PrivacyConfigError, match="boolean"):
        audit_bound([1.0, 2.0], np.array([1, 0]), delta=0.0)
    with pytest.raises(PrivacyConfigError, match="not finite"):
        audit_bound([1.0, math.nan], np.array([True, False]), delta=0.0)
    with pytest.raises(PrivacyConfigError, match="exceed the 2 canaries"):
        correct_guesses([1.0, 2.0], np.array([True, False]), k_plus=2, k_minus=1)
