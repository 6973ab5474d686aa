"""Fixed-point quantisation into Z_{2^32}: error bounds, overflow headroom, clipping."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.privacy.quantize import QuantizationParams, dequantize_sum, quantize


@settings(max_examples=40, deadline=None)
@given(
    num_summands=st.integers(min_value=1, max_value=1000),
    count_fraction=st.floats(min_value=0.0, max_value=1.0),
    clip=st.floats(min_value=1e-3, max_value=1e3),
    length=st.integers(min_value=1, max_value=64),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_sum_error_is_at_most_one_level_per_summand(
    num_summands: int, count_fraction: float, clip: float, length: int, seed: int
) -> None:
    params = QuantizationParams(clip=clip, num_summands=num_summands)
    count = max(1, min(num_summands, 8, round(count_fraction * num_summands)))
    rng = np.random.default_rng(seed)
    updates = rng.uniform(-clip, clip, size=(count, length))
    total = np.zeros(length, dtype=np.uint32)
    for update in updates:
        total += quantize(update, params, rng=rng).values
    recovered = dequantize_sum(total, params, count=count)
    error = np.abs(recovered - updates.sum(axis=0))
    # one rounding step (< 1/scale) per summand, plus float64 slack for the offset removal
    assert np.all(error <= count / params.scale + 1e-9 * count * clip)


def test_single_value_error_below_one_level() -> None:
    params = QuantizationParams(clip=2.0, num_summands=7)
    rng = np.random.default_rng(0)
    values = rng.uniform(-2.0, 2.0, size=10_000).astype(np.float32)
    quantized = quantize(values, params, rng=rng)
    assert np.all(
        np.abs(dequantize_sum(quantized.values, params, count=1) - values) < 1 / params.scale
    )


def test_stochastic_rounding_is_unbiased() -> None:
    params = QuantizationParams(clip=1.0, num_summands=2**31)  # one level is 1.0 wide
    assert params.max_level == 1 and params.scale == 0.5
    value = np.full(200_000, 0.3)  # (0.3 + 1) * 0.5 = 0.65 levels
    quantized = quantize(value, params, rng=np.random.default_rng(1)).values
    assert set(np.unique(quantized)) == {0, 1}
    # P(round up) = 0.65; the standard error of the mean is about 0.001
    assert abs(quantized.mean() - 0.65) < 0.01


@pytest.mark.parametrize("num_summands", [1, 3, 100, 10_000])
def test_no_overflow_at_max_summands_and_extreme_values(num_summands: int) -> None:
    params = QuantizationParams(clip=0.5, num_summands=num_summands)
    rng = np.random.default_rng(2)
    high = quantize(np.full(16, 0.5), params, rng=rng).values
    low = quantize(np.full(16, -0.5), params, rng=rng).values
    assert np.all(high == params.max_level) and np.all(low == 0)
    exact = high.astype(np.uint64) * num_summands  # the true sum, without wrap-around
    assert int(exact.max()) < 2**32
    total = np.zeros(16, dtype=np.uint32)
    for _ in range(min(num_summands, 50)):
        total += high
    count = min(num_summands, 50)
    np.testing.assert_allclose(dequantize_sum(total, params, count=count), 0.5 * count)
    np.testing.assert_allclose(dequantize_sum(low, params, count=1), -0.5)


def test_fewer_bits_keep_the_sum_below_two_to_the_bits() -> None:
    params = QuantizationParams(clip=1.0, num_summands=10, bits=20)
    assert params.max_level * 10 < 2**20
    assert params.max_level * 11 >= 2**20 - 10  # the headroom is no larger than needed


def test_clipping_is_counted_and_applied() -> None:
    params = QuantizationParams(clip=1.0, num_summands=4)
    values = np.array([2.0, -3.0, 0.5, np.inf, -np.inf, 1.0, -1.0])
    quantized = quantize(values, params, rng=np.random.default_rng(3))
    assert quantized.num_clipped == 4
    recovered = dequantize_sum(quantized.values, params, count=1)
    np.testing.assert_allclose(recovered, [1, -1, 0.5, 1, -1, 1, -1], atol=1 / params.scale)


def test_rejects_nan_and_bad_shapes() -> None:
    params = QuantizationParams(clip=1.0, num_summands=2)
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.array([0.0, np.nan]), params, rng=rng)
    with pytest.raises(ValueError, match="1-D float array"):
        quantize(np.zeros((2, 2)), params, rng=rng)
    with pytest.raises(ValueError, match="1-D float array"):
        quantize(np.zeros(3, dtype=np.int64), params, rng=rng)
    with pytest.raises(ValueError, match="count=3"):
        dequantize_sum(np.zeros(2, dtype=np.uint32), params, count=3)
    with pytest.raises(ValueError, match="uint32"):
        dequantize_sum(np.zeros(2, dtype=np.int64), params, count=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip": 0.0, "num_summands": 2}, "clip=0.0"),
        ({"clip": float("inf"), "num_summands": 2}, "clip=inf"),
        ({"clip": 1.0, "num_summands": 0}, "num_summands=0"),
        ({"clip": 1.0, "num_summands": 2, "bits": 33}, "bits=33"),
        ({"clip": 1.0, "num_summands": 16, "bits": 4}, "num_summands=16"),
    ],
)
def test_params_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizationParams(**kwargs)
