"""Privacy accounting and noise calibration: pure functions over a DP-SGD history.

This module owns the arithmetic that turns a history of DP-SGD work into ε and a target ε into
a noise multiplier. It keeps no state (the per-site ledger in :mod:`fedpeft.privacy.ledger`
holds the history) and writes no accounting of its own: ε comes from Opacus' accountants,
picked by name from Opacus' registry (``opacus.accountants.create_accountant``), and the noise
search is Opacus' ``get_noise_multiplier``. What is added here is input validation with clear
errors, a feasibility check before the search, and a canonical form of the history.

A history is a sequence of ``(noise_multiplier, sample_rate, steps)`` entries: ``steps``
Poisson-subsampled Gaussian steps with that noise multiplier σ (noise std over clip norm) and
sampling rate q. Composition does not depend on order, so entries with the same (σ, q) are
merged by summing their steps before they reach the accountant. This keeps the PRV accountant
fast over many rounds and makes the ε of a history of *k* identical rounds exactly the ε that
calibration computed for ``k * steps`` steps.

Cost: PRV is tighter than RDP but slower (~0.1-1 s per ε on these CPUs; a calibration runs a
dozen of them), and very slow for extreme histories (σ well below 1 with q near 1, or millions
of steps), where RDP stays fast. Opacus ships no type information; the project's mypy
configuration types its objects as ``Any``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Final

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedpeft.names import Accountant
from fedpeft.privacy.errors import PrivacyConfigError

__all__ = [
    "ACCOUNTANTS",
    "MAX_NOISE_MULTIPLIER",
    "HistoryEntry",
    "calibrate_noise_multiplier",
    "canonical_history",
    "compute_epsilon",
]

#: ``(noise_multiplier, sample_rate, steps)``, the format of Opacus' ``accountant.history``.
HistoryEntry = tuple[float, float, int]

#: Accountants that may be named (:class:`fedpeft.names.Accountant`, where the reason Opacus's
#: "gdp" is not among them is written).
ACCOUNTANTS: Final[tuple[str, ...]] = tuple(a.value for a in Accountant)

#: Largest noise multiplier calibration will return. A target needing more noise than this is
#: treated as impossible: the update would be pure noise (Opacus' own limit is 1e6).
MAX_NOISE_MULTIPLIER: Final[float] = 1e3


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyConfigError(
            f"accountant={accountant!r} is not supported; use one of {ACCOUNTANTS}."
        )


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_delta(delta: float) -> None:
    if not (_is_real(delta) and 0.0 < delta < 1.0):
        raise PrivacyConfigError(
            f"delta={delta!r} must be a number in the open interval (0, 1); a usual choice is "
            "below 1/N for N examples at the site, e.g. 1e-5."
        )


def _check_sample_rate(sample_rate: float, *, name: str = "sample_rate") -> None:
    if not (_is_real(sample_rate) and 0.0 < sample_rate <= 1.0):
        raise PrivacyConfigError(
            f"{name}={sample_rate!r} must be in (0, 1]: the probability that an example is "
            "in a batch (expected batch size / number of examples)."
        )


def _check_steps(steps: int, *, name: str = "steps", minimum: int = 0) -> None:
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < minimum:
        raise PrivacyConfigError(f"{name}={steps!r} must be an integer >= {minimum}.")


def canonical_history(history: Iterable[HistoryEntry]) -> list[HistoryEntry]:
    """Validate a history and merge entries with the same (σ, q).

    Parameters
    ----------
    history : iterable of (noise_multiplier, sample_rate, steps)
        DP-SGD work done, in any order.

    Returns
    -------
    list of HistoryEntry
        One entry per distinct ``(noise_multiplier, sample_rate)`` pair in order of first
        appearance, with the steps summed; entries with zero steps are dropped.

    Raises
    ------
    PrivacyConfigError
        If an entry is malformed: σ negative or not finite, q outside (0, 1], steps not an
        integer >= 0.
    """
    merged: dict[tuple[float, float], int] = {}
    for index, entry in enumerate(history):
        try:
            sigma, rate, steps = entry
        except (TypeError, ValueError):
            raise PrivacyConfigError(
                f"history[{index}]={entry!r} must be (noise_multiplier, sample_rate, steps)."
            ) from None
        if not (_is_real(sigma) and math.isfinite(sigma) and sigma >= 0):
            raise PrivacyConfigError(
                f"history[{index}] noise_multiplier={sigma!r} must be a finite number >= 0."
            )
        _check_sample_rate(rate, name=f"history[{index}] sample_rate")
        _check_steps(steps, name=f"history[{index}] steps")
        if steps == 0:
            continue
        key = (float(sigma), float(rate))
        merged[key] = merged.get(key, 0) + int(steps)
    return [(sigma, rate, steps) for (sigma, rate), steps in merged.items()]


def compute_epsilon(
    history: Iterable[HistoryEntry], *, delta: float, accountant: str = "prv"
) -> float:
    """ε spent by a history of DP-SGD work, at a given δ.

    The history is merged (see :func:`canonical_history`) and loaded into a fresh Opacus
    accountant (``accountant.history = [...]``, which both accountants read directly), and its
    ``get_epsilon(delta)`` is returned: for PRV the upper end of its error interval.

    Parameters
    ----------
    history : iterable of (noise_multiplier, sample_rate, steps)
        All the DP-SGD work to account for.
    delta : float
        Target δ in (0, 1).
    accountant : {"prv", "rdp"}, default "prv"
        Opacus accountant to use.

    Returns
    -------
    float
        ε >= 0; 0.0 for an empty history; ``math.inf`` if any step had no noise (σ = 0).

    Raises
    ------
    PrivacyConfigError
        If δ, the accountant name or an entry is invalid, or the accountant fails on it.
    """
    _check_delta(delta)
    _check_accountant(accountant)
    entries = canonical_history(history)
    if not entries:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in entries):
        return math.inf  # a noiseless step releases its gradient exactly
    acc = create_accountant(mechanism=accountant)
    acc.history = list(entries)
    try:
        epsilon = float(acc.get_epsilon(delta=delta))
    except (ValueError, ArithmeticError) as exc:
        raise PrivacyConfigError(
            f"the {accountant!r} accountant could not compute ε for history {entries} at "
            f"delta={delta!r}: {exc}. Try accountant='rdp', or a larger noise multiplier."
        ) from exc
    if math.isnan(epsilon) or epsilon < 0:
        raise PrivacyConfigError(
            f"the {accountant!r} accountant returned ε={epsilon!r} for history {entries} at "
            f"delta={delta!r}; try accountant='rdp'."
        )
    return epsilon


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    epsilon_tolerance: float | None = None,
) -> float:
    """Smallest noise multiplier (within tolerance) whose ε after ``steps`` steps is <= target.

    Call this before any training: an impossible target raises here, not halfway through.

    Parameters
    ----------
    target_epsilon : float
        ε to reach after all ``steps`` steps, > 0.
    delta : float
        Target δ in (0, 1).
    sample_rate : float
        Poisson sampling rate q in (0, 1]; for an Opacus ``DPDataLoader`` built from a
        loader with ``len(loader)`` batches this is ``1 / len(loader)``
        (see :func:`fedpeft.privacy.dp.poisson_sample_rate`).
    steps : int
        Total number of noisy steps the budget must cover, >= 1 (e.g. rounds × local steps).
    accountant : {"prv", "rdp"}, default "prv"
        Opacus accountant; use the same one the ledger uses.
    epsilon_tolerance : float, optional
        The search stops once ``target - tolerance <= ε <= target``. Defaults to 0.01 or 1% of
        the target, whichever is smaller.

    Returns
    -------
    float
        σ with ``compute_epsilon([(σ, sample_rate, steps)], ...) <= target_epsilon``.

    Raises
    ------
    PrivacyConfigError
        If an argument is invalid, or the target needs σ > :data:`MAX_NOISE_MULTIPLIER`.
    """
    if not (_is_real(target_epsilon) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyConfigError(
            f"target_epsilon={target_epsilon!r} must be a finite number > 0 (e.g. 8)."
        )
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    _check_steps(steps, minimum=1)
    _check_accountant(accountant)
    tolerance = min(0.01, target_epsilon / 100) if epsilon_tolerance is None else epsilon_tolerance
    if not (_is_real(tolerance) and 0 < tolerance < target_epsilon):
        raise PrivacyConfigError(
            f"epsilon_tolerance={epsilon_tolerance!r} must be in (0, target_epsilon="
            f"{target_epsilon!r}); leave it unset for 1% of the target (at most 0.01)."
        )

    floor = compute_epsilon(
        [(MAX_NOISE_MULTIPLIER, sample_rate, steps)], delta=delta, accountant=accountant
    )
    if floor > target_epsilon:
        raise PrivacyConfigError(
            f"target_epsilon={target_epsilon!r} cannot be reached: even noise multiplier "
            f"{MAX_NOISE_MULTIPLIER:g} gives ε={floor:.4g} after {steps} steps at "
            f"sample_rate={sample_rate:g}, delta={delta:g}. Raise the target ε, or lower the "
            "number of steps (rounds × local steps) or the sampling rate (smaller batches)."
        )
    try:
        sigma = float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=tolerance,
            )
        )
    except (ValueError, ArithmeticError) as exc:
        raise PrivacyConfigError(
            f"noise calibration failed for target_epsilon={target_epsilon!r}, delta={delta!r}, "
            f"sample_rate={sample_rate!r}, steps={steps!r}, accountant={accountant!r}: {exc}. "
            "Raise the target ε or lower steps / sampling rate."
        ) from exc
    if sigma > MAX_NOISE_MULTIPLIER:
        raise PrivacyConfigError(
            f"target_epsilon={target_epsilon!r} needs noise multiplier {sigma:.4g}, above the "
            f"limit {MAX_NOISE_MULTIPLIER:g}. Raise the target ε or lower steps / sampling rate."
        )
    return sigma
