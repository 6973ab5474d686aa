"""The one-run privacy audit's statistics: from canary scores to a lower bound on ε.

This module owns the arithmetic of the audit of Steinke, Nasr and Jagielski, "Privacy Auditing
with One (1) Training Run" (NeurIPS 2023, arXiv:2305.08846): how guesses are made from the
scores of m canaries, the p-value of their Theorem 3.1, and the largest ε that theorem rejects.
It keeps no state and knows nothing of models or Flower; running the training with canaries
and scoring them is :mod:`fedpeft.audit`.

The game. Each of m canaries is included in the training data independently with probability
½ (``S_i = +1`` in, ``-1`` out). After one training run the auditor computes a score per
canary from the output alone (higher: more likely in), guesses "in" (``T_i = +1``) for the
``k_plus`` highest scores and "out" (``T_i = -1``) for the ``k_minus`` lowest, and abstains on
the rest, so it makes ``r = k_plus + k_minus`` guesses; ``v`` of them are correct.

The theorem (their Theorem 3.1, computed as their Appendix D code computes it). If training
is (ε, δ)-DP with respect to adding or removing each canary, then for every v

    P[W >= v] <= f(v) + 2 m δ · max_{i = 1..v} (f(v - i) - f(v)) / i,
    f(u) = P[Binomial(r, e^ε / (1 + e^ε)) >= u],

where W counts the correct guesses: with δ = 0 the auditor is no better than r independent
ε-randomised-response answers; δ enters only through the second term, with the total number
of canaries m (not r). The maximum over ``i > v`` adds nothing (there ``f(v - i) = 1`` and the
ratio falls with i). The p-value of an observed v under the claim (ε, δ) is the right-hand
side (capped at 1); the audit's lower bound at confidence 1 - β is the largest ε whose
p-value is below β. The p-value grows with ε, so the bound is found by bisection, as Appendix D
does, and rounded *down*: every ε below the returned value is rejected.

Choosing k. The theorem holds for k fixed before the scores are seen. Choosing the best of
several (k_plus, k_minus) after seeing them is a multiple test; :func:`audit_bound` therefore
tests each candidate of a grid fixed in advance at level β / (number of candidates)
(Bonferroni), so the reported bound keeps its 1 - β confidence. (The paper reports the best of
its sweep without that correction.)

Why written here: neither Opacus nor any installed package audits DP; the reference
implementations (the paper's Appendix D, and ``jax_privacy.auditing`` of Google DeepMind,
``_one_run_p_value`` / ``_epsilon_one_run``) are a dozen lines over two binomial tails, and
jax_privacy needs JAX and ``dp_accounting``. The tails come from scipy (``binom.sf``,
``binom.pmf``); only the formula above and the search are written here. The p-values equal those of
Appendix D's code, and the bounds agree with it within its 30-step bisection (about 1e-9), on
the cases in ``tests/privacy/test_audit_bound.py``.
Scipy ships no type information; the project's mypy configuration types it as ``Any``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import expit
from scipy.stats import binom

from fedpeft.privacy.errors import PrivacyConfigError

__all__ = [
    "DEFAULT_BETA",
    "AuditBound",
    "audit_bound",
    "correct_guesses",
    "epsilon_lower_bound",
    "guess_grid",
    "p_value",
]

#: 1 - confidence of the audit's lower bound (the paper's 95%).
DEFAULT_BETA: Final[float] = 0.05

# Bisection steps on ε after bracketing: the bracket is at most a few dozen wide, so 60
# halvings leave it below 1e-15 of that, well under float64's resolution at ε ~ 1.
_BISECTION_STEPS: Final[int] = 60
# Beyond ε = 64 the logistic e^ε / (1 + e^ε) is 1 in float64, where every guess is correct
# with probability 1 and the p-value is 1: the bracket search stops there at the latest.
_EPSILON_CAP: Final[float] = 64.0


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_counts(*, canaries: int, guesses: int, correct: int) -> None:
    problems = []
    if not (_is_int(canaries) and canaries >= 1):
        problems.append(f"canaries={canaries!r} must be an integer >= 1 (m, all canaries)")
    if not (_is_int(guesses) and guesses >= 0):
        problems.append(f"guesses={guesses!r} must be an integer >= 0 (r, non-abstentions)")
    if not (_is_int(correct) and correct >= 0):
        problems.append(f"correct={correct!r} must be an integer >= 0 (v)")
    if not problems and not correct <= guesses <= canaries:
        problems.append(
            f"need 0 <= correct <= guesses <= canaries, got correct={correct}, "
            f"guesses={guesses}, canaries={canaries}"
        )
    if problems:
        raise PrivacyConfigError("invalid audit counts: " + "; ".join(problems) + ".")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and not isinstance(delta, bool) and 0 <= delta <= 1):
        raise PrivacyConfigError(
            f"delta={delta!r} must be a number in [0, 1]: the δ of the claim being audited "
            "(the ledger's δ; 0 for pure ε-DP)."
        )


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 < beta < 1):
        raise PrivacyConfigError(
            f"beta={beta!r} must be in (0, 1): 1 - the confidence of the lower bound "
            f"(e.g. {DEFAULT_BETA} for 95%)."
        )


def _p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Theorem 3.1's bound on P[W >= v] (unchecked arguments)."""
    if v == 0:
        return 1.0
    q = float(expit(epsilon))  # accuracy of ε-randomised response, e^ε / (1 + e^ε)
    tail = float(binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    if delta == 0:
        return min(tail, 1.0)
    # (f(v - i) - f(v)) = P[v - i <= Binomial(r, q) < v] for i = 1..v, as running sums of
    # the pmf at v-1, v-2, ..., 0 (Appendix D's loop, vectorised).
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
    ratio = float(np.max(below / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * ratio, 1.0)


def p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of at least ``correct`` correct guesses if training were (ε, δ)-DP.

    The right-hand side of Theorem 3.1 of Steinke, Nasr and Jagielski (2023), capped at 1
    (see the module docstring).

    Parameters
    ----------
    canaries : int
        m, the number of canaries, each included independently with probability ½.
    guesses : int
        r, the guesses made (``k_plus + k_minus``; abstentions excluded).
    correct : int
        v, the correct guesses, ``0 <= v <= r <= m``.
    epsilon : float
        ε >= 0 of the claim tested.
    delta : float
        δ in [0, 1] of the claim tested.

    Returns
    -------
    float
        The p-value in [0, 1]; the claim is rejected at level β when it is below β.

    Raises
    ------
    PrivacyConfigError
        If a count, ε or δ is out of range.
    """
    _check_counts(canaries=canaries, guesses=guesses, correct=correct)
    _check_delta(delta)
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon >= 0):
        raise PrivacyConfigError(f"epsilon={epsilon!r} must be a finite number >= 0.")
    return _p_value(int(canaries), int(guesses), int(correct), float(epsilon), float(delta))


def epsilon_lower_bound(
    *, canaries: int, guesses: int, correct: int, delta: float, beta: float = DEFAULT_BETA
) -> float:
    """The largest ε that ``correct`` of ``guesses`` correct guesses reject at level β.

    With probability at least 1 - β over the canaries' inclusion, a training run that is
    (ε, δ)-DP gives a value no larger than ε (Theorem 3.1 of Steinke, Nasr and Jagielski 2023;
    the search of their Appendix D, run until the bracket is below float resolution).

    Parameters
    ----------
    canaries : int
        m, the number of canaries (enters through the δ term).
    guesses : int
        r, the number of guesses made.
    correct : int
        v, the number of correct guesses.
    delta : float
        δ of the claim audited, in [0, 1].
    beta : float, default 0.05
        1 - confidence, in (0, 1).

    Returns
    -------
    float
        ε_lb >= 0; 0 when even ε = 0 is not rejected (e.g. at chance accuracy).

    Raises
    ------
    PrivacyConfigError
        If a count, δ or β is out of range.
    """
    _check_counts(canaries=canaries, guesses=guesses, correct=correct)
    _check_delta(delta)
    _check_beta(beta)
    m, r, v, d = int(canaries), int(guesses), int(correct), float(delta)
    if _p_value(m, r, v, 0.0, d) >= beta:
        return 0.0
    low, high = 0.0, 1.0  # invariant: p(low) < beta <= p(high)
    while _p_value(m, r, v, high, d) < beta:
        low, high = high, 2.0 * high
        if high > _EPSILON_CAP:  # unreachable in float64 (p = 1 there); kept as a guard
            return low
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if _p_value(m, r, v, middle, d) < beta:
            low = middle
        else:
            high = middle
    return low


def correct_guesses(scores: ArrayLike, included: ArrayLike, *, k_plus: int, k_minus: int) -> int:
    """Correct guesses when guessing "in" on the ``k_plus`` highest scores, "out" on the
    ``k_minus`` lowest and abstaining on the rest.

    Ties are broken by canary index (a stable sort), which depends on the scores' order only,
    never on which canaries were included.

    Parameters
    ----------
    scores : array_like of float, shape (m,)
        One score per canary, computed from the training run's output; higher means more
        likely included.
    included : array_like of bool, shape (m,)
        Whether each canary was in the training data.
    k_plus, k_minus : int
        Guesses of each kind, ``k_plus + k_minus <= m``.

    Returns
    -------
    int
        v, in ``[0, k_plus + k_minus]``.

    Raises
    ------
    PrivacyConfigError
        If the arrays differ in shape, hold non-finite scores, or the k do not fit.
    """
    score, member = _check_scores(scores, included)
    m = score.shape[0]
    if not (_is_int(k_plus) and _is_int(k_minus) and k_plus >= 0 and k_minus >= 0):
        raise PrivacyConfigError(
            f"k_plus={k_plus!r} and k_minus={k_minus!r} must be integers >= 0."
        )
    if k_plus + k_minus > m:
        raise PrivacyConfigError(
            f"k_plus + k_minus = {k_plus + k_minus} guesses exceed the {m} canaries; "
            f"use at most {m} guesses in all."
        )
    order = np.argsort(score, kind="stable")  # ascending
    top = order[m - k_plus :] if k_plus else order[:0]
    bottom = order[:k_minus]
    return int(member[top].sum() + (~member[bottom]).sum())


def _check_scores(
    scores: ArrayLike, included: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    score = np.asarray(scores, dtype=np.float64)
    member = np.asarray(included)
    if score.ndim != 1 or member.shape != score.shape or score.shape[0] == 0:
        raise PrivacyConfigError(
            f"scores and included must be 1-D arrays of the same non-zero length (one entry per "
            f"canary); got shapes {score.shape} and {member.shape}."
        )
    if member.dtype != np.bool_:
        raise PrivacyConfigError(
            f"included must be a boolean array (True: the canary was trained on); got dtype "
            f"{member.dtype}."
        )
    if not bool(np.isfinite(score).all()):
        bad = int((~np.isfinite(score)).sum())
        raise PrivacyConfigError(
            f"{bad} of {score.shape[0]} canary scores are not finite; a score must be a real "
            "number computed from the training output."
        )
    return score, member


def guess_grid(canaries: int) -> tuple[tuple[int, int], ...]:
    """The (k_plus, k_minus) candidates :func:`audit_bound` tries by default for m canaries.

    Six guess counts k spaced geometrically from ``min(10, m // 2)`` to ``m // 2``, each
    one-sided (``(k, 0)``: only "in" guesses, the strongest when some included canaries were
    never sampled and so look excluded) and two-sided (``(k, k)``, the paper's k+ = k-).
    Fixed by m alone, before any score is seen.

    Raises
    ------
    PrivacyConfigError
        If ``canaries < 2``.
    """
    if not (_is_int(canaries) and canaries >= 2):
        raise PrivacyConfigError(f"canaries={canaries!r} must be an integer >= 2.")
    half = int(canaries) // 2
    counts = np.unique(np.round(np.geomspace(min(10, half), half, 6)).astype(int))
    return tuple((int(k), k_minus) for k in counts for k_minus in (0, int(k)))


@dataclass(frozen=True)
class AuditBound:
    """The audit's result for one set of canary scores.

    Attributes
    ----------
    epsilon_lower_bound : float
        ε_lb: the best candidate's bound at level ``beta / candidates`` (so the maximum over
        candidates holds at confidence ``1 - beta``).
    canaries : int
        m.
    included : int
        Canaries that were in the training data.
    guesses : int
        r = k_plus + k_minus of the best candidate.
    k_plus, k_minus : int
        Its "in" and "out" guesses.
    correct : int
        v, its correct guesses.
    beta : float
        1 - confidence of ``epsilon_lower_bound``.
    delta : float
        δ of the audited claim.
    candidates : int
        Number of (k_plus, k_minus) tried (the Bonferroni factor).
    claimed_epsilon : float or None
        ε of the claim, if one was given.
    p_value : float or None
        Bonferroni-adjusted p-value of the claim ``(claimed_epsilon, delta)``: the smallest
        candidate p-value times ``candidates``, capped at 1. Below ``beta``: the claim is
        rejected at confidence ``1 - beta``.
    """

    epsilon_lower_bound: float
    canaries: int
    included: int
    guesses: int
    k_plus: int
    k_minus: int
    correct: int
    beta: float
    delta: float
    candidates: int
    claimed_epsilon: float | None = None
    p_value: float | None = None

    @property
    def violation(self) -> bool:
        """Whether the claim is rejected: its adjusted p-value is below β."""
        return self.p_value is not None and self.p_value < self.beta


def audit_bound(
    scores: ArrayLike,
    included: ArrayLike,
    *,
    delta: float,
    beta: float = DEFAULT_BETA,
    claimed_epsilon: float | None = None,
    grid: Sequence[tuple[int, int]] | None = None,
) -> AuditBound:
    """The one-run audit's lower bound on ε from canary scores and their inclusion.

    For every ``(k_plus, k_minus)`` of ``grid`` counts the correct guesses
    (:func:`correct_guesses`) and computes :func:`epsilon_lower_bound` at level
    ``beta / len(grid)``; reports the best. With ``claimed_epsilon`` it also tests the claim
    ``(claimed_epsilon, delta)`` directly (:attr:`AuditBound.p_value`).

    Parameters
    ----------
    scores : array_like of float, shape (m,)
        Canary scores from the training output (higher: more likely included).
    included : array_like of bool, shape (m,)
        Which canaries were trained on.
    delta : float
        δ of the claim audited (the ledger's δ), in [0, 1].
    beta : float, default 0.05
        1 - confidence, in (0, 1).
    claimed_epsilon : float, optional
        ε the privacy accounting claims (e.g. the ledger's), >= 0.
    grid : sequence of (int, int), optional
        The candidates, fixed before the scores are seen; default :func:`guess_grid` (m).

    Returns
    -------
    AuditBound

    Raises
    ------
    PrivacyConfigError
        If the scores, δ, β, the claim or a candidate is invalid.
    """
    score, member = _check_scores(scores, included)
    _check_delta(delta)
    _check_beta(beta)
    m = int(score.shape[0])
    candidates = tuple(grid) if grid is not None else guess_grid(m)
    if not candidates:
        raise PrivacyConfigError("grid is empty; give at least one (k_plus, k_minus) pair.")
    if claimed_epsilon is not None and not (
        isinstance(claimed_epsilon, (int, float))
        and math.isfinite(claimed_epsilon)
        and claimed_epsilon >= 0
    ):
        raise PrivacyConfigError(
            f"claimed_epsilon={claimed_epsilon!r} must be a finite number >= 0 or None."
        )
    level = beta / len(candidates)
    tried: list[tuple[float, int, int, int]] = []  # (bound, k_plus, k_minus, correct)
    smallest_p = 1.0
    for k_plus, k_minus in candidates:
        v = correct_guesses(score, member, k_plus=k_plus, k_minus=k_minus)
        r = k_plus + k_minus
        tried.append(
            (
                epsilon_lower_bound(canaries=m, guesses=r, correct=v, delta=delta, beta=level),
                k_plus,
                k_minus,
                v,
            )
        )
        if claimed_epsilon is not None:
            smallest_p = min(smallest_p, _p_value(m, r, v, float(claimed_epsilon), float(delta)))
    # the largest bound; among equal bounds the first candidate (the fewest guesses)
    bound, k_plus, k_minus, v = max(tried, key=lambda t: t[0])
    return AuditBound(
        epsilon_lower_bound=bound,
        canaries=m,
        included=int(member.sum()),
        guesses=k_plus + k_minus,
        k_plus=k_plus,
        k_minus=k_minus,
        correct=v,
        beta=float(beta),
        delta=float(delta),
        candidates=len(candidates),
        claimed_epsilon=None if claimed_epsilon is None else float(claimed_epsilon),
        p_value=None if claimed_epsilon is None else min(1.0, smallest_p * len(candidates)),
    )
