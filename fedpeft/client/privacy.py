"""A site's differential privacy: its budget, its ledger, its noise, and charging a round.

The site has the last word on privacy. Its ε ceiling is the lower of the coordinator's
target (``privacy.epsilon``) and the operator's node config ``privacy-epsilon-max``; its
ledger lives on its own disk (node config ``ledger-path``, or ``privacy.ledger_dir`` in
a simulation) and outlives runs. The noise multiplier is calibrated once per run so that
the ledger's earlier history plus every planned round of this run stays within the
ceiling; each round is charged to the ledger *before* training and refused, training
nothing, when it would cross the ceiling. DP-SGD itself is :mod:`fedpeft.privacy.dp`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedpeft import constants as K
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


def _bind_round(ledger_file: Path, *, run_id: str, round_number: int, global_digest: str) -> None:
    """Remember which global adapter each charged round started from; refuse a different one."""
    path = ledger_file.with_name(ledger_file.name + ".rounds.json")
    bound: dict[str, str] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    key = f"{run_id}/{round_number}"
    if key in bound and bound[key] != global_digest:
        raise PrivacyConfigError(
            f"{REPLAY_REFUSAL}: round {round_number} of federation {run_id!r} was already "
            "charged for a different global adapter; training it again would release a second "
            "update for one charge. The coordinator must start a new round."
        )
    if key not in bound:
        bound[key] = global_digest
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(bound, indent=1), encoding="utf-8")
        os.replace(tmp, path)


REPLAY_REFUSAL = "replayed round refused"


def round_seed(secret: bytes, *, run_id: str, round_number: int) -> int:
    """HMAC-SHA256(secret, "run/round") as a 63-bit seed: stable for a retried round."""
    digest = hmac.new(secret, f"{run_id}/{round_number}".encode(), hashlib.sha256)
    return int.from_bytes(digest.digest()[:8], "big") >> 1


@dataclass(frozen=True)
class SitePrivacy:
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

    def seed(self, *, run_id: str, round_number: int) -> int:
        """A 63-bit seed for this round's sampling and noise, known only to the site."""
        return round_seed(self.secret, run_id=run_id, round_number=round_number)

    @property
    def dp(self) -> DPSettings:
        return DPSettings(self.noise_multiplier, self.max_grad_norm, self.clipping)

    def charge(self, *, run_id: str, round_number: int, global_digest: str) -> None:
        """Charge one round before training; raises ``BudgetExceededError`` past the ceiling.

        A round already charged is trained again without a second charge only when it starts
        from the same global adapter (a retry after a crash, which repeats the same noisy
        release); asked again with a different adapter, the site refuses: that would be a
        second release for one charge.
        """
        _bind_round(
            self.ledger.path, run_id=run_id, round_number=round_number, global_digest=global_digest
        )
        self.ledger.record(
            run_id=run_id,
            round=round_number,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps_per_round,
            ceiling_epsilon=self.ceiling,
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


def _float_setting(node_config: Mapping[str, object], key: str) -> float | None:
    if key not in node_config:
        return None
    value = node_config[key]
    try:
        return float(str(value))
    except ValueError:
        raise ConfigError(f"node config {key}={value!r} is not a number") from None


def ledger_path(config: FedPeftConfig, node_config: Mapping[str, object], site_name: str) -> Path:
    """Where this site's ledger lives: node config first, then the simulation's folder."""
    if K.NODE_LEDGER_PATH in node_config:
        return Path(str(node_config[K.NODE_LEDGER_PATH])).expanduser()
    if config.privacy.ledger_dir:
        slug = site_name.replace(" ", "-").replace("/", "_")
        return Path(config.privacy.ledger_dir) / f"{slug}.json"
    raise ConfigError(
        f"privacy.enabled=true but this site has no ledger: start its SuperNode with "
        f"--node-config \"{K.NODE_LEDGER_PATH}='/var/lib/fedpeft/ledger.json'\" (a file on the "
        "site's disk that is kept across runs)."
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


_PLANS: dict[str, SitePrivacy] = {}


def site_privacy(
    config: FedPeftConfig,
    node_config: Mapping[str, object],
    *,
    site_name: str,
    num_train: int,
    run_id: str,
) -> SitePrivacy:
    """The site's privacy plan for this run (calibrated once, then cached)."""
    path = ledger_path(config, node_config, site_name)
    key = repr((run_id, str(path), config.privacy, config.train, config.federation.rounds))
    if key in _PLANS:
        return _PLANS[key]
    node_ceiling = _float_setting(node_config, K.NODE_EPSILON_MAX)
    ceiling = (
        config.privacy.epsilon
        if node_ceiling is None
        else min(node_ceiling, config.privacy.epsilon)
    )
    delta = (
        _float_setting(node_config, K.NODE_DELTA)
        or config.privacy.delta
        or _stored_delta(path)
        or 1.0 / (10 * num_train)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    ledger = PrivacyLedger(path, delta=delta, accountant=config.privacy.accountant)
    # Poisson sampling at the rate Opacus uses for a loader of ceil(N / B) batches.
    sample_rate = 1.0 / math.ceil(num_train / config.train.batch_size)
    steps = config.train.local_steps
    if config.privacy.noise_multiplier is not None:
        sigma = float(config.privacy.noise_multiplier)
    else:
        prior = [
            (e.noise_multiplier, e.sample_rate, e.steps)
            for e in ledger.entries
            if e.run_id != run_id
        ]  # this run's own rounds are part of the plan
        sigma = calibrate_with_history(
            prior=prior,
            target_epsilon=ceiling,
            delta=delta,
            sample_rate=sample_rate,
            steps=config.federation.rounds * steps,
            accountant=config.privacy.accountant,
        )
    plan = SitePrivacy(
        ledger=ledger,
        ceiling=ceiling,
        delta=delta,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps_per_round=steps,
        max_grad_norm=config.privacy.max_grad_norm,
        clipping=config.privacy.clipping,
        secret=site_secret(path),
    )
    _PLANS[key] = plan
    return plan
