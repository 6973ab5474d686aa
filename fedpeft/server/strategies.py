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
:mod:`fedpeft.server.app`; the maths stays here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedpeft.config import StrategyConfig
from fedpeft.model import AdapterLayout

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
        full = np.zeros(self.layout.size, dtype=np.float32)
        trained = set(self.trained_names())
        offset_full = offset_delta = 0
        for name, numel in zip(self.layout.names, self.layout.numels, strict=True):
            if name in trained:
                full[offset_full : offset_full + numel] = mean_delta[
                    offset_delta : offset_delta + numel
                ]
                offset_delta += numel
            offset_full += numel
        return full


class FedAvg(Strategy):
    """FedIT: every adapter tensor (LoRA A, LoRA B, head) is averaged on its own.

    Biased for LoRA: mean(B)·mean(A) ≠ mean(B·A). Kept as the field's baseline.
    """

    def trained_names(self) -> tuple[str, ...]:
        return self.layout.names

    def apply(self, global_flat: FloatArray, mean_delta: FloatArray) -> FloatArray:
        step = self.config.server_lr * self._scatter(mean_delta)
        return (global_flat + step).astype(np.float32)


STRATEGIES: dict[str, Callable[[StrategyConfig, AdapterLayout], Strategy]] = {
    "fedavg": FedAvg,
}


def make_strategy(config: StrategyConfig, layout: AdapterLayout) -> Strategy:
    """The strategy named ``config.name``."""
    return STRATEGIES[config.name](config, layout)
