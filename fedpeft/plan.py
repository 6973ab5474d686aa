"""What DP-SGD will do at each site, before any training: ``fedpeft plan``.

Per site it states what the site's own calibration decides
(:func:`fedpeft.client.budget.plan_noise`: δ, the Poisson rate q, σ), the expected batch
q·N, the steps, the ε the site will have spent after each planned round (Opacus's
accountant on the planned history), and whether the noise leaves the trained coordinates
anything to learn from.

Noise against signal, per trained coordinate. One DP-SGD step adds Gaussian noise of standard
deviation σ·C to every coordinate of the sum of the Poisson batch's clipped per-example
gradients (each of norm at most C; fedpeft divides that sum by ``train.batch_size``, which
scales noise and signal alike). The batch holds q·N examples on average, so the sum has norm at
most q·N·C; spread over the d coordinates trained, that is at most q·N·C/√d per coordinate
(root mean square), and exactly that only when every example's gradient points the same way.
The ratio

    ρ = σ·C / (q·N·C/√d) = σ·√d / (q·N)

does not depend on C. With ρ > 1 the noise of a step is larger than any signal its examples
can put on a coordinate: those coordinates move by noise first. LoRA's coordinates (tens of
thousands) and the classifier head's (hundreds) are rated apart, as the head can learn where
LoRA cannot. What lowers ρ: fewer trained coordinates (``lora.r=1``, fewer adapted modules,
the head alone), more examples per step (a larger ``privacy.sample_rate``, a larger site), a
smaller σ (fewer steps, a larger ε). σ depends on q, so :func:`best_sample_rate` searches the
rate with the smallest σ/q, the one that lowers ρ at every site at once.

``fedpeft simulate`` runs the same check on the simulation's sites before it starts and says
which sites' LoRA coordinates cannot learn (:func:`warnings_for`).

Written here because nothing in Opacus or peft states it: Opacus calibrates σ for a budget and
says nothing about what that noise leaves of the gradient.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from fedpeft import constants as K
from fedpeft.config import FedPeftConfig

if TYPE_CHECKING:
    from fedpeft.preflight import PreflightReport

__all__ = [
    "CoordinateGroup",
    "SitePlan",
    "best_sample_rate",
    "noise_to_signal",
    "plan_site",
    "simulation_plans",
    "table",
    "trained_coordinates",
    "warnings_for",
]

#: ρ above which a group of coordinates is said not to learn (the noise of one step is
#: larger than the largest per-coordinate signal its batch can carry).
RHO_LIMIT = 1.0
#: Sampling rates :func:`best_sample_rate` tries (the federation's q is one for every site).
CANDIDATE_RATES = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5)


def noise_to_signal(*, sigma: float, sample_rate: float, num_train: int, coordinates: int) -> float:
    """ρ = σ·√d / (q·N): a step's noise over the largest per-coordinate signal (see above)."""
    if coordinates <= 0:
        return 0.0
    return sigma * math.sqrt(coordinates) / (sample_rate * num_train)


@dataclass(frozen=True)
class CoordinateGroup:
    """Trained coordinates of one kind (LoRA factors, biases, the classifier head) and their ρ."""

    name: str
    coordinates: int
    noise_to_signal: float

    @property
    def learns(self) -> bool:
        return self.noise_to_signal <= RHO_LIMIT


@dataclass(frozen=True)
class SitePlan:
    """One site's planned DP-SGD and what it leaves of the signal."""

    site: str
    num_train: int
    delta: float
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    epsilons: tuple[float, ...]  # spent after each planned round
    groups: tuple[CoordinateGroup, ...]

    @property
    def expected_batch(self) -> float:
        return self.sample_rate * self.num_train

    @property
    def body(self) -> CoordinateGroup | None:
        """The model's own trained coordinates: LoRA's, else the biases' (BitFit); the head is
        rated beside them."""
        return next((g for g in self.groups if g.name in ("LoRA", "bias")), None)

    def verdict(self) -> str:
        """One plain sentence: which coordinates can learn, and what would help."""
        body = self.body
        head = next((g for g in self.groups if g.name == "head"), None)
        where = f"at N = {self.num_train:,} and q = {self.sample_rate:g}"
        if body is None:
            return f"{where}: no LoRA coordinates are trained"
        label = "LoRA's" if body.name == "LoRA" else "the biases'"
        if body.learns:
            return (
                f"{where}: {label} {body.coordinates:,} coordinates can learn "
                f"(noise {body.noise_to_signal:.2g}× the largest per-coordinate signal)"
            )
        head_part = (
            f"; the head's {head.coordinates:,} can ({head.noise_to_signal:.2g}×)"
            if head is not None and head.learns
            else ""
        )
        subject = "LoRA" if body.name == "LoRA" else "the biases"
        return (
            f"{where} and d = {body.coordinates:,} the noise is ~{body.noise_to_signal:.2g}× "
            f"any per-coordinate signal: {subject} will not learn{head_part}. Train fewer "
            "coordinates (lora.r=1, fewer lora.target_modules), a larger "
            "privacy.sample_rate, fewer train.local_steps, or a larger site"
        )


def trained_coordinates(config: FedPeftConfig) -> dict[str, int]:
    """Coordinates each site trains, by kind (``LoRA``, ``bias``, ``head``), for this
    configuration's model, strategy and schedule (the adapter is built on the CPU; no data is
    read)."""
    import torch

    from fedpeft.model import build_model, is_bias, is_head
    from fedpeft.names import Trainable
    from fedpeft.server.strategies import make_strategy

    loaded = build_model(config.model, config.lora, seed=config.seed, device=torch.device("cpu"))
    layout = make_strategy(config.strategy, loaded.layout).trained_layout()
    counts = {"LoRA": 0, "bias": 0, "head": 0}
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        kind = "head" if is_head(name) else "bias" if is_bias(name) else "LoRA"
        counts[kind] += math.prod(shape)
    schedule = set(config.train.trainable)
    if Trainable.lora not in schedule:  # head (and bias) rounds only: LoRA never trains
        counts["LoRA"] = 0
    if not schedule & {Trainable.bias, Trainable.lora}:  # head rounds only
        counts["bias"] = 0
    return counts


def plan_site(
    config: FedPeftConfig,
    *,
    site: str,
    num_train: int,
    coordinates: dict[str, int],
    noise_multiplier: float | None = None,
) -> SitePlan:
    """The plan of a site with ``num_train`` training examples, the coordinator's ε and δ,
    and no earlier ledger.

    ``noise_multiplier`` reuses a σ already calibrated for these settings (it does not depend
    on N when ``privacy.sample_rate`` and ``privacy.delta`` are set).

    Raises
    ------
    SiteRefusal, PrivacyConfigError
        As the site itself would: a δ above 1/N, an ε no σ reaches.
    """
    from fedpeft.client.budget import plan_noise
    from fedpeft.client.rules import site_rules

    if noise_multiplier is not None:  # calibrated already: plan_noise takes it as given
        config = replace(config, privacy=replace(config.privacy, noise_multiplier=noise_multiplier))
    # the coordinator's ε and δ, as a simulated site takes them (a deployed site's node config
    # may lower its ceiling or set its own δ; its ledger may hold earlier runs)
    rules = site_rules({K.NODE_PARTITION_ID: 0})
    noise = plan_noise(config, rules, num_train=num_train, stored_delta=None, prior=lambda _: [])
    sigma = noise.noise_multiplier
    epsilons = tuple(
        _epsilon(
            sigma,
            noise.sample_rate,
            noise.steps_per_round * r,
            noise.delta,
            config.privacy.accountant,
        )
        for r in range(1, config.federation.rounds + 1)
    )
    groups = tuple(
        CoordinateGroup(
            name,
            count,
            noise_to_signal(
                sigma=sigma, sample_rate=noise.sample_rate, num_train=num_train, coordinates=count
            ),
        )
        for name, count in coordinates.items()
        if count
    )
    return SitePlan(
        site=site,
        num_train=num_train,
        delta=noise.delta,
        sample_rate=noise.sample_rate,
        steps_per_round=noise.steps_per_round,
        noise_multiplier=sigma,
        epsilons=epsilons,
        groups=groups,
    )


@functools.lru_cache(maxsize=256)
def _epsilon(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    from fedpeft.privacy.calibration import compute_epsilon

    return compute_epsilon([(sigma, sample_rate, steps)], delta=delta, accountant=accountant)


def simulation_plans(config: FedPeftConfig, report: PreflightReport) -> list[SitePlan]:
    """The plans of a simulation's sites, from what its preflight found (N and σ per site)."""
    coordinates = trained_coordinates(config)
    return [
        plan_site(
            config, site=f"site {pid}", num_train=n, coordinates=coordinates, noise_multiplier=sigma
        )
        for pid, (n, sigma) in enumerate(
            zip(report.num_train, report.noise_multipliers, strict=True)
        )
    ]


def best_sample_rate(
    config: FedPeftConfig, *, rates: Sequence[float] = CANDIDATE_RATES
) -> tuple[float, float] | None:
    """The rate among ``rates`` with the smallest σ/q (so the smallest ρ at every site of
    the same δ), and its σ, for this configuration's ε, δ, rounds and steps; None when σ is
    fixed (``privacy.noise_multiplier``) or no rate can be calibrated. With few steps σ/q
    falls as q grows, so this is often the largest rate tried: each step then trains on
    q·N examples (memory, time), and the noisy sum is still divided by train.batch_size."""
    from fedpeft.client.budget import calibrate_with_history
    from fedpeft.privacy.errors import PrivacyError

    p, steps = config.privacy, config.federation.rounds * config.train.local_steps
    if p.noise_multiplier is not None:
        return None
    delta = p.delta if p.delta is not None else 1e-5
    found: list[tuple[float, float, float]] = []
    for q in rates:
        try:
            sigma = calibrate_with_history(
                prior=[],
                target_epsilon=p.epsilon,
                delta=delta,
                sample_rate=q,
                steps=steps,
                accountant=p.accountant,
            )
        except PrivacyError:  # this rate cannot reach the target: not a candidate
            continue
        found.append((sigma / q, q, sigma))
    if not found:
        return None
    _, q, sigma = min(found)
    return q, sigma


def table(plans: Sequence[SitePlan]) -> str:
    """The plans as a fixed-width table (one line per site) and one verdict line each."""
    rounds = len(plans[0].epsilons) if plans else 0
    names = [g.name for g in plans[0].groups] if plans else []
    header = (
        f"{'site':<8} {'N':>7} {'q':>6} {'batch':>7} {'steps':>5} {'σ':>7} "
        + " ".join(f"{'ε r' + str(r):>7}" for r in range(1, rounds + 1))
        + "".join(f" {'ρ ' + n:>8}" for n in names)
    )
    lines = [header, "-" * len(header)]
    for plan in plans:
        lines.append(
            f"{plan.site:<8} {plan.num_train:>7,} {plan.sample_rate:>6.3g} "
            f"{plan.expected_batch:>7.1f} {plan.steps_per_round:>5} {plan.noise_multiplier:>7.3f} "
            + " ".join(f"{e:>7.2f}" for e in plan.epsilons)
            + "".join(f" {g.noise_to_signal:>8.3g}" for g in plan.groups)
        )
    lines.append("")
    lines += [f"{plan.site}: {plan.verdict()}" for plan in plans]
    return "\n".join(lines)


def warnings_for(plans: Sequence[SitePlan]) -> list[str]:
    """What ``fedpeft simulate`` says before it starts: the sites whose LoRA (or, without
    LoRA, biases) cannot learn."""
    stuck = [p for p in plans if p.body is not None and not p.body.learns]
    if not stuck:
        return []
    worst = max(stuck, key=lambda p: p.body.noise_to_signal if p.body is not None else 0.0)
    what = "LoRA" if worst.body is not None and worst.body.name == "LoRA" else "the biases"
    return [
        f"{len(stuck)} of {len(plans)} site(s) train {what} under more DP noise than any "
        f"per-coordinate signal ('fedpeft plan' with the same overrides shows every site); "
        f"the worst, {worst.site}: {worst.verdict()}"
    ]
