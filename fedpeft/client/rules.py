"""A site's privacy rules, from its node config: what the coordinator can never override.

Kept apart from :mod:`fedpeft.client.budget` (which imports the training stack) so that the
ClientApp can check them, and a coordinator's signature, before loading torch or a model.
See :class:`SiteRules` for each setting and README, "Who decides what".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedpeft import constants as K
from fedpeft.client.errors import SiteRefusal
from fedpeft.config import ConfigError, FedPeftConfig
from fedpeft.privacy.signing import load_public_key

__all__ = ["SiteRules", "require_privacy", "site_declaration", "site_rules"]


def _float_setting(node_config: Mapping[str, object], key: str) -> float | None:
    if key not in node_config:
        return None
    value = node_config[key]
    try:
        number = float(str(value))
    except ValueError:
        raise ConfigError(f"node config {key}={value!r} is not a number") from None
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"node config {key}={value!r} must be a finite number > 0")
    return number


def _bool_setting(node_config: Mapping[str, object], key: str, *, default: bool) -> bool:
    if key not in node_config:
        return default
    value = node_config[key]
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ConfigError(f"node config {key}={value!r} must be true or false")


@dataclass(frozen=True)
class SiteRules:
    """What a site's operator decided about privacy in its node config.

    Attributes
    ----------
    deployed : bool
        A real site (its node config has no simulation ``partition-id``): the rules below
        are enforced, and nothing of the run config can loosen them.
    ledger_path : Path or None
        ``ledger-path``.
    epsilon_max : float or None
        ``privacy-epsilon-max``.
    delta : float or None
        ``privacy-delta``: the δ of a deployed site (required there); the run's
        ``privacy.delta`` applies to simulation partitions only.
    privacy_required : bool
        ``privacy-required`` (default true): refuse runs with DP off.
    coordinator_key : Ed25519PublicKey or None
        ``coordinator-public-key``: train and evaluate only for instructions it signed.
    secagg_required : bool
        ``secagg-required`` (default false): refuse runs without secure aggregation.
    secagg_min_sites : int or None
        ``secagg-min-sites``: refuse a secure round whose threshold (the fewest shares, so
        the fewest sites, a released sum can rest on) is below it.
    """

    deployed: bool
    ledger_path: Path | None
    epsilon_max: float | None
    delta: float | None
    privacy_required: bool
    coordinator_key: Ed25519PublicKey | None
    secagg_required: bool = False
    secagg_min_sites: int | None = None


def site_rules(node_config: Mapping[str, object]) -> SiteRules:
    """The site's privacy rules from its node config (checked, with clear errors)."""
    ledger = node_config.get(K.NODE_LEDGER_PATH)
    key_path = node_config.get(K.NODE_COORDINATOR_PUBLIC_KEY)
    return SiteRules(
        deployed=K.NODE_PARTITION_ID not in node_config,
        ledger_path=Path(str(ledger)).expanduser() if ledger else None,
        epsilon_max=_float_setting(node_config, K.NODE_EPSILON_MAX),
        delta=_float_setting(node_config, K.NODE_DELTA),
        privacy_required=_bool_setting(node_config, K.NODE_PRIVACY_REQUIRED, default=True),
        coordinator_key=load_public_key(Path(str(key_path)).expanduser()) if key_path else None,
        secagg_required=_bool_setting(node_config, K.NODE_SECAGG_REQUIRED, default=False),
        secagg_min_sites=_int_setting(node_config, K.NODE_SECAGG_MIN_SITES),
    )


def site_declaration(node_config: Mapping[str, object]) -> dict[str, str | int]:
    """What the site chose to publish about its data (``site-description``, ``site-license``,
    ``site-rows``): only the keys its node config sets; sent with its train replies.

    Raises
    ------
    ConfigError
        If a value is malformed (checked before anything is trained or charged).
    """
    from fedpeft.model_card import parse_declaration

    try:
        return parse_declaration(node_config, source="node config")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _int_setting(node_config: Mapping[str, object], key: str) -> int | None:
    if key not in node_config:
        return None
    value = node_config[key]
    try:
        number = int(str(value))
    except ValueError:
        raise ConfigError(f"node config {key}={value!r} is not an integer") from None
    if number < 2:
        raise ConfigError(f"node config {key}={value!r} must be an integer >= 2")
    return number


def require_privacy(config: FedPeftConfig, rules: SiteRules) -> None:
    """Refuse (before any work) a run whose privacy this deployed site does not accept."""
    if not rules.deployed:
        return
    if rules.secagg_required and not config.secagg.enabled:
        raise SiteRefusal(
            K.ERR_SECAGG_REQUIRED,
            f"the run has secagg.enabled=false and this site's node config says "
            f"{K.NODE_SECAGG_REQUIRED}=true; refused (nothing trained or evaluated)",
        )
    if not config.privacy.enabled:
        if rules.privacy_required:
            raise SiteRefusal(
                K.ERR_DP_REQUIRED,
                "the run has privacy.enabled=false and this site's node config does not say "
                f"{K.NODE_PRIVACY_REQUIRED}=false; refused (nothing trained)",
            )
        return
    if rules.ledger_path is None:
        raise SiteRefusal(
            K.ERR_LEDGER_REQUIRED,
            "privacy is on but this site has no ledger: start its SuperNode with "
            f"--node-config \"{K.NODE_LEDGER_PATH}='/var/lib/fedpeft/ledger.json' ...\" (a "
            "file on the site's disk, kept across runs); privacy.ledger_dir of the run "
            "config is not used at a deployed site",
        )
    if rules.epsilon_max is None:
        raise SiteRefusal(
            K.ERR_CEILING_REQUIRED,
            f"this site's node config has no {K.NODE_EPSILON_MAX}: a deployed site sets its "
            f'own ε ceiling, e.g. --node-config "{K.NODE_EPSILON_MAX}=8.0 ..."',
        )
    if rules.delta is None:
        raise SiteRefusal(
            K.ERR_DELTA_REQUIRED,
            f"this site's node config has no {K.NODE_DELTA}: a deployed site sets its own δ "
            f'(below 1/N for its N examples), e.g. --node-config "{K.NODE_DELTA}=1e-5 ..."; '
            "the run's privacy.delta is not used at a deployed site (the coordinator could "
            "otherwise scan it against 1/N, or fix the ledger's δ for life)",
        )
