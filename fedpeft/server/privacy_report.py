"""What the coordinator knows and reports about privacy: ``privacy.json``.

The server cannot *enforce* a site's budget (only the site can: it holds the ledger);
it records what each site reported — ε spent so far over the site's whole ledger, δ,
the accountant, noise multiplier, sampling rate, steps, clip norm — notices sites that
refused a round for their budget, and states plainly what the server itself saw of
the updates (everything, or only sums under secure aggregation).
"""

from __future__ import annotations

from typing import Any

from fedpeft import constants as K
from fedpeft.config import FedPeftConfig


class PrivacyReport:
    """Per-site privacy figures as reported by the sites, round after round."""

    def __init__(self, config: FedPeftConfig) -> None:
        self.config = config
        self.sites: dict[str, dict[str, Any]] = {}
        self.exhausted: dict[str, str] = {}  # node id → the site's refusal

    def observe(
        self, round_number: int, site_metrics: dict[str, dict[str, Any]], failures: dict[str, str]
    ) -> None:
        """Take in one round's reported figures and budget refusals."""
        for node, figures in site_metrics.items():
            privacy = {k: figures[k] for k in K.PRIVACY_METRICS if k in figures}
            if privacy:
                self.sites[node] = {**privacy, "last_round": round_number}
        for node, reason in failures.items():
            if reason.split(":", 1)[0] == K.REFUSAL_BUDGET:
                self.exhausted[node] = reason

    def epsilons(self) -> dict[str, float]:
        return {node: float(f[K.MET_EPSILON]) for node, f in self.sites.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"sites": self.sites, "exhausted": self.exhausted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sites = dict(state.get("sites", {}))
        self.exhausted = dict(state.get("exhausted", {}))

    def as_json(self) -> dict[str, Any]:
        """The content of ``privacy.json``."""
        p, s = self.config.privacy, self.config.secagg
        sites = {
            node: {
                "epsilon": f.get(K.MET_EPSILON),
                "epsilon_ceiling": f.get(K.MET_EPSILON_CEILING),
                "delta": f.get(K.MET_DELTA),
                "accountant": p.accountant,
                "noise_multiplier": f.get(K.MET_NOISE_MULTIPLIER),
                "sampling_rate": f.get(K.MET_SAMPLE_RATE),
                "steps": f.get(K.MET_DP_STEPS),
                "clip_norm": f.get(K.MET_MAX_GRAD_NORM),
                "clipping_mode": p.clipping,
                "last_round": f.get("last_round"),
                "budget_exhausted": node in self.exhausted,
            }
            for node, f in sorted(self.sites.items())
        }
        return {
            "differential_privacy": {
                "enabled": p.enabled,
                "unit": "one training example at one site (sample-level DP-SGD, Opacus)",
                "target_epsilon": p.epsilon,
                "target_delta": p.delta,
                "note": (
                    "ε per site is computed by the site from its own ledger (all runs it "
                    "took part in) with Opacus's accountant; the coordinator only reports "
                    "it. A site's node config ceiling overrides the target."
                ),
            },
            "sites": sites,
            "refusals": self.exhausted,
            "secure_aggregation": {
                "enabled": s.enabled,
                "server_sees": (
                    "only the sum of the sampled sites' quantised updates "
                    "(SecAgg+, semi-honest server)"
                )
                if s.enabled
                else "each site's update in the clear",
                "clip_range": s.clip_range,
                "num_neighbours": s.num_neighbours,
                "threshold": s.threshold,
                "weighting": "uniform" if s.enabled else "examples",
            },
        }
