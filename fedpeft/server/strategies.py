"""LoRA-aware aggregation strategies, picked by name from :data:`STRATEGIES`.

A strategy decides two things: which adapter tensors the sites train and send back
(:meth:`Strategy.trained_names`), and how the server turns the weighted mean of the
sites' deltas into the next global adapter (:meth:`Strategy.apply`). Every strategy
here needs only *sums* of the sites' deltas, so each composes with secure aggregation,
which reveals nothing but the sum.

Why not Flower's ``flwr.serverapp.strategy.FedAvg``: its ``start()`` loop sends one
train and one evaluate exchange per round and aggregates whole ArrayRecords, while
fedpeft needs the aggregation to act on a flat delta that may arrive as a securely
aggregated sum over several exchanges. The round loop lives in
:mod:`fedpeft.server.federation`; the maths stays here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedpeft.config import StrategyConfig
from fedpeft.model import AdapterLayout
from fedpeft.names import ServerOptimizerName, StrategyName

FloatArray = NDArray[np.float32]


def weighted_mean(vectors: Sequence[FloatArray], weights: Sequence[float]) -> FloatArray:
    """``sum_i w_i v_i / sum_i w_i`` in float64, returned as float32."""
    if not vectors or len(vectors) != len(weights):
        raise ValueError(f"need one weight per vector, got {len(vectors)} and {len(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    acc = np.zeros(vectors[0].shape, dtype=np.float64)
    for vector, weight in zip(vectors, weights, strict=True):
        acc += float(weight) * vector.astype(np.float64)
    return (acc / total).astype(np.float32)


class Strategy(ABC):
    """How the global adapter moves from one round to the next."""

    def __init__(self, config: StrategyConfig, layout: AdapterLayout) -> None:
        self.config = config
        self.layout = layout

    @abstractmethod
    def trained_names(self) -> tuple[str, ...]:
        """Names (in layout order) of the tensors the sites train and send back."""

    def trained_layout(self) -> AdapterLayout:
        wanted = set(self.trained_names())
        return self.layout.subset(lambda name: name in wanted)

    @abstractmethod
    def apply(self, global_flat: FloatArray, mean_delta: FloatArray) -> FloatArray:
        """The next global adapter from the current one and the sites' mean delta.

        ``mean_delta`` is laid out as :meth:`trained_layout`; the result as ``layout``.
        """

    def state_dict(self) -> dict[str, Any]:
        """What a restarted server needs to continue (e.g. optimiser moments)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if state:
            raise ValueError(f"strategy {self.config.name!r} keeps no state, got {sorted(state)}")

    def _scatter(self, mean_delta: FloatArray) -> FloatArray:
        """``mean_delta`` (trained layout) placed into a zero vector of the full layout."""
        return widen(mean_delta, self.trained_layout(), self.layout)


def widen(delta: FloatArray, part: AdapterLayout, whole: AdapterLayout) -> FloatArray:
    """``delta`` laid out as ``part`` (a subset of ``whole``), zeros for the rest of ``whole``.

    Raises
    ------
    ValueError
        If ``delta`` is not of ``part``'s size, or ``part`` names a tensor ``whole`` lacks.
    """
    if delta.shape != (part.size,):
        raise ValueError(f"delta of shape {delta.shape} is not laid out as ({part.size},)")
    stray = sorted(set(part.names) - set(whole.names))
    if stray:
        raise ValueError(f"{len(stray)} tensor(s) are not in the adapter: {stray[:3]}")
    if part.names == whole.names:
        return delta.astype(np.float32, copy=False)
    at = dict(zip(part.names, np.cumsum((0,) + part.numels[:-1]), strict=True))
    out = np.zeros(whole.size, dtype=np.float32)
    offset = 0
    for name, numel in zip(whole.names, whole.numels, strict=True):
        if name in at:
            out[offset : offset + numel] = delta[int(at[name]) : int(at[name]) + numel]
        offset += numel
    return out


def lora_pairs(layout: AdapterLayout) -> list[tuple[str, str]]:
    """``(lora_A name, lora_B name)`` for every adapted module, in layout order."""
    names = set(layout.names)
    pairs = []
    for name in layout.names:
        if ".lora_A." in name:
            partner = name.replace(".lora_A.", ".lora_B.")
            if partner not in names:
                raise ValueError(f"adapter has {name} but no matching {partner}")
            pairs.append((name, partner))
    return pairs


class ServerOptimizer(ABC):
    """Turns the sites' mean delta (a pseudo-gradient) into the step the server takes."""

    @abstractmethod
    def step(self, mean_delta: FloatArray) -> FloatArray:
        """The step to add to the trained tensors of the global adapter."""

    def state_dict(self) -> dict[str, Any]:
        """What a restarted server needs to continue (none for a stateless rule)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - stateless default
        """Restore :meth:`state_dict`."""


class ServerAverage(ServerOptimizer):
    """FedAvg's server rule: ``step = server_lr · mean_delta``."""

    def __init__(self, config: StrategyConfig) -> None:
        self.lr = config.server_lr

    def step(self, mean_delta: FloatArray) -> FloatArray:
        return (self.lr * mean_delta).astype(np.float32)


class ServerAdam(ServerOptimizer):
    """FedAdam (Reddi et al., ICLR 2021), the rule of Flower's ``FedAdam``.

    ``m = β1·m + (1-β1)·Δ``, ``v = β2·v + (1-β2)·Δ²``, ``step = lr · m / (√v + τ)``,
    with Δ the sites' mean delta and no bias correction (as in the paper and Flower).
    """

    def __init__(self, config: StrategyConfig) -> None:
        self.lr, self.tau = config.server_lr, config.adam_tau
        self.beta1, self.beta2 = config.adam_beta1, config.adam_beta2
        self.m: NDArray[np.float64] | None = None
        self.v: NDArray[np.float64] | None = None

    def step(self, mean_delta: FloatArray) -> FloatArray:
        delta = mean_delta.astype(np.float64)
        if self.m is None or self.v is None:
            self.m, self.v = np.zeros_like(delta), np.zeros_like(delta)
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        self.v = self.beta2 * self.v + (1 - self.beta2) * delta**2
        return (self.lr * self.m / (np.sqrt(self.v) + self.tau)).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        if self.m is None or self.v is None:
            return {}
        return {"m": self.m.tolist(), "v": self.v.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.m = np.asarray(state["m"], dtype=np.float64)
            self.v = np.asarray(state["v"], dtype=np.float64)


SERVER_OPTIMIZERS: dict[ServerOptimizerName, Callable[[StrategyConfig], ServerOptimizer]] = {
    ServerOptimizerName.average: ServerAverage,
    ServerOptimizerName.adam: ServerAdam,
}


class FedAvg(Strategy):
    """FedIT: every adapter tensor (LoRA A, LoRA B, head) is averaged on its own.

    Biased for LoRA: mean(B)·mean(A) ≠ mean(B·A), and the cross terms grow with local
    steps, non-IID data and DP noise. Kept as the field's baseline.
    """

    def __init__(self, config: StrategyConfig, layout: AdapterLayout) -> None:
        super().__init__(config, layout)
        self.optimizer = SERVER_OPTIMIZERS[config.server_optimizer](config)

    def trained_names(self) -> tuple[str, ...]:
        return self.layout.names

    def apply(self, global_flat: FloatArray, mean_delta: FloatArray) -> FloatArray:
        step = self._scatter(self.optimizer.step(mean_delta))
        return (global_flat + step).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state.get("optimizer", {}))


class FFALoRA(FedAvg):
    """FFA-LoRA (Sun et al., ICLR 2024): A stays at its shared initialisation, only B trains.

    With A fixed and common, ``mean_i(B_i)·A = mean_i(B_i·A)``: the aggregate is the exact
    mean of the sites' ΔW, needs only sums (so it composes with secure aggregation), and
    the upload halves. The initial A comes from the seed every side shares.
    """

    def trained_names(self) -> tuple[str, ...]:
        return tuple(n for n in self.layout.names if ".lora_A." not in n)


class FedSVD(FFALoRA):
    """FFA-LoRA plus a server-side re-factorisation of ``B·A`` by truncated SVD each round.

    After B is aggregated with A fixed, the server writes ``B·A = U S Vᵀ`` and sends
    ``A' = Vᵀ[:r]`` (orthonormal rows) and ``B' = U[:, :r]·S[:r]``; ``B'·A' = B·A``, so the
    model is unchanged, but the next round trains B in a subspace that follows the data.
    Post-processing of the aggregate: differential privacy is unaffected.

    With mixed ranks (:mod:`fedpeft.ranks`) the rows of ``A'`` are ordered by singular value,
    so a site of rank ``r_i < r``, which trains the leading block ``B[:, :r_i]`` against
    ``A'[:r_i]``, trains the ``r_i`` most important directions of the current ``ΔW``.
    """

    def apply(self, global_flat: FloatArray, mean_delta: FloatArray) -> FloatArray:
        updated = super().apply(global_flat, mean_delta)
        return refactorize(updated, self.layout)


def refactorize(flat: FloatArray, layout: AdapterLayout) -> FloatArray:
    """Replace each (A, B) pair by the truncated SVD factors of ``B·A`` (same product)."""
    out = flat.copy()
    offsets = dict(zip(layout.names, np.cumsum((0,) + layout.numels[:-1]), strict=True))
    shapes = dict(zip(layout.names, layout.shapes, strict=True))
    for a_name, b_name in lora_pairs(layout):
        (rank, d_in), (d_out, _) = shapes[a_name], shapes[b_name]
        a_at, b_at = int(offsets[a_name]), int(offsets[b_name])
        a = flat[a_at : a_at + rank * d_in].reshape(rank, d_in).astype(np.float64)
        b = flat[b_at : b_at + d_out * rank].reshape(d_out, rank).astype(np.float64)
        if not b.any():  # B·A = 0 (a pair not trained yet): no basis to follow, A stays
            continue
        u, sigma, vt = np.linalg.svd(b @ a, full_matrices=False)  # (d_out,k) (k,) (k,d_in)
        new_a = vt[:rank]
        new_b = u[:, :rank] * sigma[:rank]
        if new_a.shape[0] < rank:  # d_in or d_out smaller than the rank: pad with zeros
            new_a = np.vstack([new_a, np.zeros((rank - new_a.shape[0], d_in))])
            new_b = np.hstack([new_b, np.zeros((d_out, rank - new_b.shape[1]))])
        out[a_at : a_at + rank * d_in] = new_a.reshape(-1)
        out[b_at : b_at + d_out * rank] = new_b.reshape(-1)
    return out


STRATEGIES: dict[StrategyName, Callable[[StrategyConfig, AdapterLayout], Strategy]] = {
    StrategyName.fedavg: FedAvg,
    StrategyName.ffa: FFALoRA,
    StrategyName.fedsvd: FedSVD,
}


def make_strategy(config: StrategyConfig, layout: AdapterLayout) -> Strategy:
    """The strategy named ``config.name``."""
    return STRATEGIES[config.name](config, layout)
