"""Aggregation maths with hand-computed expectations."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.config import StrategyConfig
from fedpeft.model import AdapterLayout, split_flat
from fedpeft.server.strategies import (
    FedAvg,
    FedSVD,
    FFALoRA,
    ServerAdam,
    make_strategy,
    refactorize,
    weighted_mean,
)

A, B, HEAD = "m.q.lora_A.default.weight", "m.q.lora_B.default.weight", "m.cls.modules_to_save.w"
RANK, D_IN, D_OUT = 3, 5, 4
LAYOUT = AdapterLayout(names=(A, B, HEAD), shapes=((RANK, D_IN), (D_OUT, RANK), (2,)))


def _flat(a: np.ndarray, b: np.ndarray, head: np.ndarray) -> np.ndarray:
    return np.concatenate([a.ravel(), b.ravel(), head.ravel()]).astype(np.float32)


def _sites(rng: np.random.Generator, n: int = 4) -> list[np.ndarray]:
    return [rng.standard_normal(LAYOUT.size).astype(np.float32) * 0.3 for _ in range(n)]


def test_weighted_mean_by_hand() -> None:
    got = weighted_mean(
        [np.array([1.0, 0.0], np.float32), np.array([0.0, 4.0], np.float32)], [1, 3]
    )
    np.testing.assert_allclose(got, [0.25, 3.0])
    with pytest.raises(ValueError, match="one weight per vector"):
        weighted_mean([np.zeros(2, np.float32)], [1, 2])


def test_ffa_trains_only_b_and_head() -> None:
    strategy = make_strategy(StrategyConfig(name="ffa"), LAYOUT)
    assert isinstance(strategy, FFALoRA)
    assert strategy.trained_names() == (B, HEAD)
    assert strategy.trained_layout().size == D_OUT * RANK + 2  # half-ish of the upload


def test_ffa_aggregate_is_the_exact_mean_of_site_delta_w() -> None:
    rng = np.random.default_rng(0)
    start = rng.standard_normal(LAYOUT.size).astype(np.float32)
    a0 = split_flat(start, LAYOUT)[A]
    strategy = FFALoRA(StrategyConfig(name="ffa"), LAYOUT)
    trained = strategy.trained_layout()
    deltas = [rng.standard_normal(trained.size).astype(np.float32) for _ in range(4)]
    new = split_flat(strategy.apply(start, weighted_mean(deltas, [1] * 4)), LAYOUT)
    site_w = [(split_flat(start, LAYOUT)[B] + split_flat(d, trained)[B]) @ a0 for d in deltas]
    np.testing.assert_allclose(new[B] @ new[A], np.mean(site_w, axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(new[A], a0)


def test_fedavg_has_the_cross_term_ffa_removes() -> None:
    rng = np.random.default_rng(1)
    start = np.zeros(LAYOUT.size, np.float32)
    sites = [split_flat(d, LAYOUT) for d in _sites(rng)]
    strategy = FedAvg(StrategyConfig(name="fedavg"), LAYOUT)
    new = split_flat(
        strategy.apply(start, weighted_mean([_flat(s[A], s[B], s[HEAD]) for s in sites], [1] * 4)),
        LAYOUT,
    )
    mean_of_products = np.mean([s[B] @ s[A] for s in sites], axis=0)
    a_bar, b_bar = np.mean([s[A] for s in sites], 0), np.mean([s[B] for s in sites], 0)
    # mean(B_i A_i) − mean(B) mean(A) = mean((B_i − B̄)(A_i − Ā)): the bias, by hand
    cross = np.mean([(s[B] - b_bar) @ (s[A] - a_bar) for s in sites], axis=0)
    np.testing.assert_allclose(new[B] @ new[A], mean_of_products - cross, rtol=1e-4, atol=1e-5)
    assert np.abs(cross).max() > 0.01  # the error is real, not rounding


def test_fedsvd_keeps_delta_w_and_makes_a_orthonormal() -> None:
    rng = np.random.default_rng(2)
    flat = rng.standard_normal(LAYOUT.size).astype(np.float32)
    before = split_flat(flat, LAYOUT)
    after = split_flat(refactorize(flat, LAYOUT), LAYOUT)
    np.testing.assert_allclose(after[B] @ after[A], before[B] @ before[A], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(after[A] @ after[A].T, np.eye(RANK), atol=1e-5)
    assert not np.allclose(after[A], before[A])
    np.testing.assert_array_equal(after[HEAD], before[HEAD])


def test_fedsvd_round_equals_ffa_round_then_refactorisation() -> None:
    rng = np.random.default_rng(3)
    start = rng.standard_normal(LAYOUT.size).astype(np.float32)
    config = StrategyConfig(name="fedsvd")
    delta = rng.standard_normal(FedSVD(config, LAYOUT).trained_layout().size).astype(np.float32)
    ffa = split_flat(FFALoRA(config, LAYOUT).apply(start, delta), LAYOUT)
    svd = split_flat(FedSVD(config, LAYOUT).apply(start, delta), LAYOUT)
    np.testing.assert_allclose(svd[B] @ svd[A], ffa[B] @ ffa[A], rtol=1e-4, atol=1e-5)


def test_server_adam_by_hand() -> None:
    config = StrategyConfig(
        server_lr=0.1, server_optimizer="adam", adam_beta1=0.9, adam_beta2=0.99, adam_tau=1e-3
    )
    adam = ServerAdam(config)
    d1, d2 = np.array([1.0, -2.0], np.float32), np.array([0.5, 0.0], np.float32)
    m1, v1 = 0.1 * d1, 0.01 * d1**2
    np.testing.assert_allclose(adam.step(d1), 0.1 * m1 / (np.sqrt(v1) + 1e-3), rtol=1e-5)
    m2, v2 = 0.9 * m1 + 0.1 * d2, 0.99 * v1 + 0.01 * d2**2
    np.testing.assert_allclose(adam.step(d2), 0.1 * m2 / (np.sqrt(v2) + 1e-3), rtol=1e-5)
    restored = ServerAdam(config)
    restored.load_state_dict(adam.state_dict())
    np.testing.assert_allclose(restored.step(d1), adam.step(d1), rtol=1e-6)


def test_fedavg_server_lr_scales_the_step() -> None:
    start = np.zeros(LAYOUT.size, np.float32)
    delta = np.ones(LAYOUT.size, np.float32)
    got = FedAvg(StrategyConfig(server_lr=0.5), LAYOUT).apply(start, delta)
    np.testing.assert_allclose(got, 0.5)
