"""A site's privacy budget for a run: its ceiling, δ, calibrated σ, ledger and secret.

This module applies the site's rules (:class:`~fedpeft.client.rules.SiteRules`, from its node
config) to a run and charges each round to the site's ledger; the arithmetic — accountants,
calibration — and the ledger itself are :mod:`fedpeft.privacy`'s. The site has the last word
on privacy. On a deployed site — any node that is not a simulation partition — the
coordinator cannot lower it:

- the ledger is the node config's ``ledger-path`` (required; ``privacy.ledger_dir`` is
  ignored) and the ceiling ``privacy-epsilon-max`` (required); the ceiling actually used is
  the lower of it and the coordinator's ``privacy.epsilon``;
- a run with DP off is refused unless the node config says ``privacy-required=false``;
- δ is the node's ``privacy-delta`` (required): the run's ``privacy.delta`` is not read at
  a deployed site, so the coordinator can neither fix a ledger's δ nor scan δ against
  ``1/N`` (a refusal that depends on its value would reveal N); a node δ above ``1/N`` is
  refused whatever the run asks.

In a simulation the virtual sites keep their ledgers in ``privacy.ledger_dir`` and take the
coordinator's ε as their ceiling (the researcher is both sides).

Nothing the site reports depends on its example count N when the coordinator sets the
sampling rate (``privacy.sample_rate``) and δ: σ is calibrated from (ceiling, δ, q, steps)
and the ledger's history only. The noise multiplier is calibrated once per run so that the
ledger's earlier history plus every planned round of this run stays within the ceiling;
each round is charged to the ledger *before* training, under the binding of everything
that shapes its release (:mod:`fedpeft.privacy.binding`), and refused, training nothing,
when it would cross the ceiling. DP-SGD itself is :mod:`fedpeft.privacy.dp`.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedpeft import constants as K
from fedpeft.client.errors import SiteRefusal
from fedpeft.client.rules import SiteRules, require_privacy, site_rules
from fedpeft.client.train import DPSettings
from fedpeft.config import ConfigError, FedPeftConfig
from fedpeft.privacy.calibration import calibrate_noise_multiplier, compute_epsilon
from fedpeft.privacy.errors import PrivacyConfigError
from fedpeft.privacy.ledger import PrivacyLedger

CALIBRATION_ITERATIONS = 24  # bisection steps on σ: relative precision ~2^-24 of the bracket


SECRET_BYTES = 32


def site_secret(ledger_file: Path) -> bytes:
    """The site's private randomness key, kept beside its ledger (created once, mode 0600).

    DP-SGD's Poisson sampling and Gaussian noise must be unpredictable to everyone but the
    site: a coordinator that could regenerate the noise could subtract it. Seeds derived
    from this key are also stable across restarts, so a retried round repeats itself.
    """
    path = ledger_file.with_name(ledger_file.name + ".secret")
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process of this site created it first
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(SECRET_BYTES))
                handle.flush()
                os.fsync(handle.fileno())
    key = path.read_bytes()
    if len(key) != SECRET_BYTES:
        raise ConfigError(
            f"site secret {str(path)!r} holds {len(key)} bytes, expected {SECRET_BYTES}; it is "
            "damaged. Restore it from backup (deleting it changes this site's DP randomness)."
        )
    return key


@dataclass(frozen=True)
class SiteBudget:
    """A site's privacy settings for one run, ready to charge rounds."""

    ledger: PrivacyLedger
    ceiling: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    max_grad_norm: float
    clipping: str
    secret: bytes
    automatic_clipping: float | None = None

    @property
    def dp(self) -> DPSettings:
        return DPSettings(
            self.noise_multiplier,
            self.max_grad_norm,
            self.clipping,
            self.sample_rate,
            self.automatic_clipping,
        )

    def settings(self) -> dict[str, object]:
        """The DP plan as it enters a release's binding."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps_per_round,
            "max_grad_norm": self.max_grad_norm,
            "clipping": self.clipping,
            "delta": self.delta,
            "accountant": self.ledger.accountant,
            "automatic_clipping": self.automatic_clipping,
        }

    def charge(self, *, run_id: str, round_number: int, binding: str) -> None:
        """Charge one release before training; raises ``BudgetExceededError`` past the ceiling.

        The ledger entry is keyed by ``binding``, the digest of everything that shapes the
        release: a retry with identical inputs (a crash) finds its entry and is not charged
        again — it repeats the identical release; any change of input is another release,
        charged again, with its own randomness.
        """
        self.ledger.record(
            run_id=run_id,
            round=round_number,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps_per_round,
            ceiling_epsilon=self.ceiling,
            binding=binding,
        )

    def metrics(self) -> dict[str, float | int]:
        """The figures the site reports with its update (ε from the whole ledger)."""
        summary = self.ledger.summary()
        return {
            K.MET_EPSILON: summary.epsilon,
            K.MET_EPSILON_CEILING: self.ceiling,
            K.MET_DELTA: self.delta,
            K.MET_NOISE_MULTIPLIER: self.noise_multiplier,
            K.MET_SAMPLE_RATE: self.sample_rate,
            K.MET_DP_STEPS: summary.total_steps,
            K.MET_MAX_GRAD_NORM: self.max_grad_norm,
        }


def ledger_path(config: FedPeftConfig, rules: SiteRules, site_name: str) -> Path:
    """Where this site's ledger lives: its node config; in a simulation, the run's folder."""
    if rules.ledger_path is not None:
        return rules.ledger_path
    if not rules.deployed and config.privacy.ledger_dir:
        slug = site_name.replace(" ", "-").replace("/", "_")
        return Path(config.privacy.ledger_dir) / f"{slug}.json"
    raise SiteRefusal(
        K.ERR_LEDGER_REQUIRED,
        f"privacy.enabled=true but this site has no ledger: start its SuperNode with "
        f"--node-config \"{K.NODE_LEDGER_PATH}='/var/lib/fedpeft/ledger.json'\" (a file on the "
        "site's disk that is kept across runs).",
    )


def _stored_delta(path: Path) -> float | None:
    """δ of an existing ledger file (its δ is fixed for life), or None."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("delta")
    except (OSError, ValueError, AttributeError):
        return None  # PrivacyLedger itself reports a corrupted file, naming it
    return float(value) if isinstance(value, float) else None


def calibrate_with_history(
    *,
    prior: list[tuple[float, float, int]],
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
) -> float:
    """Smallest σ such that ``prior`` plus ``steps`` steps at ``(σ, q)`` stays within target."""
    if not prior:
        return calibrate_noise_multiplier(
            target_epsilon=target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    spent = compute_epsilon(prior, delta=delta, accountant=accountant)
    high = 1e3
    if (
        spent >= target_epsilon
        or compute_epsilon([*prior, (high, sample_rate, steps)], delta=delta, accountant=accountant)
        > target_epsilon
    ):
        raise PrivacyConfigError(
            f"this site has already spent ε={spent:.3f} of its ceiling {target_epsilon:g} in "
            f"earlier runs; {steps} more steps cannot fit. Lower federation.rounds or "
            "train.local_steps, or give the site a higher ceiling (privacy-epsilon-max)."
        )
    low = 0.0
    for _ in range(CALIBRATION_ITERATIONS):
        mid = (low + high) / 2
        eps = (
            compute_epsilon([*prior, (mid, sample_rate, steps)], delta=delta, accountant=accountant)
            if mid > 0
            else math.inf
        )
        if eps <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


@dataclass(frozen=True)
class NoisePlan:
    """What calibration decides for one site and run, before any ledger is written."""

    ceiling: float
    delta: float
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float


def plan_noise(
    config: FedPeftConfig,
    rules: SiteRules,
    *,
    num_train: int,
    stored_delta: float | None,
    prior: Callable[[float], list[tuple[float, float, int]]],
) -> NoisePlan:
    """Ceiling, δ, q and the calibrated σ of a site: the arithmetic of :func:`site_budget`.

    Pure apart from ``prior``, which returns the ledger's history of earlier runs at the
    decided δ (``[]`` for a new ledger), so that :mod:`fedpeft.preflight` can run the very
    same calibration before a simulation starts without writing a ledger.

    Raises
    ------
    SiteRefusal
        When δ would exceed ``1/N``.
    PrivacyConfigError
        When no σ reaches the ceiling (e.g. ``privacy.epsilon=0.001``) or the ledger's
        history leaves no room.
    """
    ceiling = (
        config.privacy.epsilon
        if rules.epsilon_max is None
        else min(rules.epsilon_max, config.privacy.epsilon)
    )
    # δ: fixed for the ledger's life. A deployed site's is its own (require_privacy insists);
    # a simulation partition takes the lowest δ asked for, and only when neither side set one
    # (plain aggregation only, see fedpeft.config) does δ depend on N.
    if rules.deployed:
        asked = [d for d in (rules.delta,) if d is not None]
    else:
        asked = [d for d in (config.privacy.delta, rules.delta) if d is not None]
    delta = stored_delta or (min(asked) if asked else 1.0 / (10 * num_train))
    if delta > 1.0 / num_train:
        raise SiteRefusal(
            K.ERR_DELTA,
            f"δ={delta:g} exceeds 1/N = {1.0 / num_train:g} for this site's {num_train} "
            "training examples: with such a δ the guarantee allows releasing an example "
            f"outright. Lower the node config {K.NODE_DELTA} (a simulation: privacy.delta).",
        )
    # Poisson sampling at the coordinator's rate q (the same at every site, so it reveals no
    # N); without one, at the rate Opacus uses for a loader of ceil(N / B) batches.
    sample_rate = config.privacy.sample_rate or 1.0 / math.ceil(num_train / config.train.batch_size)
    steps = config.train.local_steps
    if config.privacy.noise_multiplier is not None:
        sigma = float(config.privacy.noise_multiplier)
    else:
        sigma = calibrate_with_history(
            prior=prior(delta),
            target_epsilon=ceiling,
            delta=delta,
            sample_rate=sample_rate,
            steps=config.federation.rounds * steps,
            accountant=config.privacy.accountant,
        )
    return NoisePlan(
        ceiling=ceiling,
        delta=delta,
        sample_rate=sample_rate,
        steps_per_round=steps,
        noise_multiplier=sigma,
    )


def _prior_history(
    path: Path, *, delta: float, config: FedPeftConfig, run_id: str
) -> list[tuple[float, float, int]]:
    """Earlier runs' DP-SGD work in the ledger at ``path`` (this run's rounds are the plan)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ledger = PrivacyLedger(path, delta=delta, accountant=config.privacy.accountant)
    return [
        (e.noise_multiplier, e.sample_rate, e.steps) for e in ledger.entries if e.run_id != run_id
    ]


def existing_history(
    path: Path, *, delta: float, config: FedPeftConfig, run_id: str
) -> list[tuple[float, float, int]]:
    """As :func:`_prior_history`, but never creating a ledger (none yet: no history)."""
    if not path.is_file():
        return []
    return _prior_history(path, delta=delta, config=config, run_id=run_id)


_PLANS: dict[str, SiteBudget] = {}


def site_budget(
    config: FedPeftConfig,
    node_config: Mapping[str, object],
    *,
    site_name: str,
    num_train: int,
    run_id: str,
) -> SiteBudget:
    """The site's privacy plan for this run (calibrated once, then cached).

    Raises
    ------
    SiteRefusal
        On a deployed site without ``ledger-path`` or ``privacy-epsilon-max``, or when δ
        would exceed ``1/N``.
    """
    rules = site_rules(node_config)
    require_privacy(config, rules)
    path = ledger_path(config, rules, site_name)
    # the rules' δ, ceiling and ledger, not their key object (a fresh object at every load)
    key = repr(
        (
            run_id,
            str(path),
            config.privacy,
            config.train,
            config.federation.rounds,
            (rules.deployed, rules.epsilon_max, rules.delta),
            num_train,
        )
    )
    if key in _PLANS:
        return _PLANS[key]
    plan = plan_noise(
        config,
        rules,
        num_train=num_train,
        stored_delta=_stored_delta(path),
        prior=lambda delta: _prior_history(path, delta=delta, config=config, run_id=run_id),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    ledger = PrivacyLedger(path, delta=plan.delta, accountant=config.privacy.accountant)
    site = SiteBudget(
        ledger=ledger,
        ceiling=plan.ceiling,
        delta=plan.delta,
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps_per_round=plan.steps_per_round,
        max_grad_norm=config.privacy.max_grad_norm,
        clipping=config.privacy.clipping,
        secret=site_secret(path),
        automatic_clipping=config.privacy.automatic_clipping,
    )
    _PLANS[key] = site
    return site
