"""Keyed ChaCha20 randomness for DP-SGD: known answers, stream properties and statistics.

Keys are fixed, so every statistical check is deterministic; each bound is about four standard
errors of the statistic at the sample size used, so a correct generator passes with any key
with overwhelming probability and a biased one (a wrong transform, a reused stream) fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedpeft.privacy import randomness
from fedpeft.privacy.errors import PrivacyConfigError
from fedpeft.privacy.randomness import (
    NOISE_INFO,
    SAMPLING_INFO,
    KeyedStream,
    PoissonBatchSampler,
    check_key,
    derive_key,
    floor_tolerant,
    new_session_key,
    session_streams,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
N = 10**6  # sample size of the statistical tests


def _chacha20(key: bytes, nonce: bytes, n: int) -> bytes:
    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(n))


# ---------------------------------------------------------------------------- known answers


def test_keystream_is_chacha20_under_the_key_with_a_zero_nonce() -> None:
    stream = KeyedStream(KEY)
    assert stream.random_bytes(1000) == _chacha20(KEY, bytes(16), 1000)
    assert stream.position == 1000


def test_uniforms_are_the_top_53_bits_of_little_endian_words() -> None:
    words = _chacha20(KEY, bytes(16), 8 * 4)
    expected = [
        (int.from_bytes(words[8 * i : 8 * i + 8], "little") >> 11) * 2.0**-53 for i in range(4)
    ]
    assert KeyedStream(KEY).uniform(4).tolist() == expected


def test_gaussians_are_box_muller_of_consecutive_uniform_pairs() -> None:
    u = KeyedStream(KEY).uniform(4)
    r0, r1 = math.sqrt(-2 * math.log(1 - u[0])), math.sqrt(-2 * math.log(1 - u[2]))
    expected = [r0 * math.cos(2 * math.pi * u[1]), r0 * math.sin(2 * math.pi * u[1])]
    expected.append(r1 * math.cos(2 * math.pi * u[3]))
    stream = KeyedStream(KEY)
    np.testing.assert_allclose(stream.standard_normal(3), expected, rtol=1e-14, atol=0)
    assert stream.position == 32  # an odd count still consumes whole pairs: no byte reused


def test_subkeys_are_hkdf_sha256_with_distinct_labels() -> None:
    def hkdf(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(KEY)

    assert derive_key(KEY, SAMPLING_INFO) == hkdf(b"fedpeft/dp/sampling")
    assert derive_key(KEY, NOISE_INFO) == hkdf(b"fedpeft/dp/noise")
    sampling, noise = session_streams(KEY)
    assert sampling.random_bytes(64) == _chacha20(hkdf(SAMPLING_INFO), bytes(16), 64)
    assert noise.random_bytes(64) == _chacha20(hkdf(NOISE_INFO), bytes(16), 64)


def test_stream_moves_to_the_next_nonce_when_the_block_counter_is_spent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 2**32 blocks `cryptography` refuses to go on; the stream switches nonce there.

    Checked with a 2-block segment standing in for the real 2**32 blocks (256 GiB).
    """
    monkeypatch.setattr(randomness, "_SEGMENT_BYTES", 128)
    stream = KeyedStream(KEY)
    head = stream.random_bytes(100)
    across = stream.random_bytes(200)  # crosses into segment 1 and into segment 2
    segment = [_chacha20(KEY, bytes(4) + s.to_bytes(12, "little"), 128) for s in range(3)]
    assert head + across == b"".join(segment)[:300]
    assert stream.position == 300
    assert len(set(segment)) == 3  # each segment is a fresh keystream, not a repeat


# ---------------------------------------------------------------------------- stream properties


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_successive_draws_continue_one_stream(sizes: list[int]) -> None:
    chunked = KeyedStream(KEY)
    parts = [chunked.uniform(n) for n in sizes]
    whole = KeyedStream(KEY).uniform(sum(sizes))
    assert np.array_equal(np.concatenate([np.empty(0), *parts]), whole)
    assert chunked.position == 8 * sum(sizes)


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_stream_position_depends_only_on_draw_sizes(sizes: list[int]) -> None:
    """Gaussian draws cost 8 bytes per value (rounded up to a pair), Bernoulli draws 8."""
    stream = KeyedStream(KEY)
    expected = 0
    for i, n in enumerate(sizes):
        if i % 2:
            stream.standard_normal(n)
            expected += 16 * ((n + 1) // 2)
        else:
            stream.bernoulli(n, 0.3)
            expected += 8 * n
    assert stream.position == expected


def test_same_key_same_stream_other_key_other_stream() -> None:
    assert np.array_equal(
        KeyedStream(KEY).standard_normal(1000), KeyedStream(KEY).standard_normal(1000)
    )
    assert not np.array_equal(
        KeyedStream(KEY).standard_normal(1000), KeyedStream(OTHER_KEY).standard_normal(1000)
    )
    sampling, noise = session_streams(KEY)
    assert sampling.random_bytes(32) != noise.random_bytes(32)


def test_new_session_keys_are_fresh() -> None:
    keys = {new_session_key() for _ in range(8)}
    assert len(keys) == 8 and all(len(k) == 32 for k in keys)


def test_gaussian_tensor_has_the_requested_shape_dtype_device_and_scale() -> None:
    reference = KeyedStream(KEY).standard_normal(2 * 3 * 5) * 0.25
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        out = KeyedStream(KEY).gaussian((2, 3, 5), std=0.25, device="cpu", dtype=dtype)
        assert out.shape == (2, 3, 5) and out.dtype == dtype and out.device.type == "cpu"
        expected = torch.from_numpy(reference.reshape(2, 3, 5)).to(dtype)  # rounded once, last
        assert torch.equal(out, expected)
    stream = KeyedStream(KEY)
    assert torch.equal(
        stream.gaussian(torch.Size([4]), std=0.0, device="cpu", dtype=torch.float32), torch.zeros(4)
    )
    assert stream.gaussian((), std=1.0, device="cpu", dtype=torch.float32).shape == ()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gaussian_tensor_lands_on_the_gpu() -> None:
    out = KeyedStream(KEY).gaussian((3, 4), std=2.0, device="cuda", dtype=torch.float32)
    assert out.device.type == "cuda"
    cpu = KeyedStream(KEY).gaussian((3, 4), std=2.0, device="cpu", dtype=torch.float32)
    assert torch.equal(out.cpu(), cpu)


# ---------------------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def normals() -> np.ndarray:
    return KeyedStream(KEY).standard_normal(N)


def test_gaussian_moments(normals: np.ndarray) -> None:
    # standard errors for n normals: mean 1/sqrt(n), variance sqrt(2/n), skewness sqrt(6/n),
    # excess kurtosis sqrt(24/n)
    assert abs(normals.mean()) < 4 / math.sqrt(N)
    assert abs(normals.var() - 1) < 4 * math.sqrt(2 / N)
    assert abs(stats.skew(normals)) < 4 * math.sqrt(6 / N)
    assert abs(stats.kurtosis(normals)) < 4 * math.sqrt(24 / N)
    assert np.abs(normals).max() <= math.sqrt(-2 * math.log(2.0**-53))  # the 8.57 bound


def test_gaussian_passes_kolmogorov_smirnov(normals: np.ndarray) -> None:
    assert stats.kstest(normals, "norm").pvalue > 1e-3
    # the two halves of each Box-Muller pair are themselves standard normals
    assert stats.kstest(normals[1::2], "norm").pvalue > 1e-3


def _assert_uncorrelated(a: np.ndarray, b: np.ndarray) -> None:
    assert abs(np.corrcoef(a, b)[0, 1]) < 4 / math.sqrt(len(a))


def test_draws_are_uncorrelated_across_keys_rounds_and_pairs(normals: np.ndarray) -> None:
    # two keys (two rounds' sessions), and two successive draws of one key
    _assert_uncorrelated(normals, KeyedStream(OTHER_KEY).standard_normal(N))
    stream = KeyedStream(OTHER_KEY)
    first, second = stream.standard_normal(N // 2), stream.standard_normal(N // 2)
    _assert_uncorrelated(first, second)
    # cosine and sine of one pair, neighbours (lag 1) and squares (a dependence in scale)
    _assert_uncorrelated(normals[0::2], normals[1::2])
    _assert_uncorrelated(normals[:-1], normals[1:])
    _assert_uncorrelated(normals[0::2] ** 2, normals[1::2] ** 2)
    # the sampling and noise streams of one session
    sampling, noise = session_streams(KEY)
    _assert_uncorrelated(sampling.uniform(N // 2), noise.uniform(N // 2))


@pytest.mark.parametrize("q", [0.003, 0.05, 0.5, 0.97])
def test_bernoulli_rate_within_binomial_error(q: float) -> None:
    draws = KeyedStream(KEY).bernoulli(N, q)
    assert draws.dtype == np.bool_
    assert abs(draws.mean() - q) < 4 * math.sqrt(q * (1 - q) / N)


def test_bernoulli_with_rate_one_keeps_everything() -> None:
    assert KeyedStream(KEY).bernoulli(10_000, 1.0).all()


def test_uniforms_are_uniform() -> None:
    u = KeyedStream(KEY).uniform(N)
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-3


# ---------------------------------------------------------------------------- the batch sampler


def test_poisson_batch_sampler_draws_independent_inclusions() -> None:
    n, q = 200, 0.1
    sampler = PoissonBatchSampler(num_samples=n, sample_rate=q, stream=KeyedStream(KEY))
    assert len(sampler) == 10
    batches = [batch for _ in range(50) for batch in sampler]  # 50 epochs continue the stream
    assert len(batches) == 500
    for batch in batches:
        assert batch == sorted(set(batch)) and all(0 <= i < n for i in batch)
        assert all(type(i) is int for i in batch)
    sizes = np.array([len(b) for b in batches])
    assert abs(sizes.mean() - q * n) < 4 * math.sqrt(n * q * (1 - q) / len(batches))
    counts = np.bincount(np.concatenate([np.array(b, dtype=int) for b in batches]), minlength=n)
    assert abs(counts.mean() / len(batches) - q) < 0.01  # every example at rate q
    assert len({tuple(b) for b in batches}) > 490  # fresh batches, not a repeated epoch
    again = PoissonBatchSampler(num_samples=n, sample_rate=q, stream=KeyedStream(KEY))
    assert [b for _ in range(50) for b in again] == batches  # same key: same batches


def test_poisson_batch_sampler_length_forgives_float_rounding() -> None:
    for batches in (3, 49, 93, 1000):
        sampler = PoissonBatchSampler(
            num_samples=5, sample_rate=1 / batches, stream=KeyedStream(KEY)
        )
        assert len(sampler) == batches  # Opacus' int(1 / (1 / 93)) is 92
    assert len(PoissonBatchSampler(num_samples=5, sample_rate=0.3, stream=KeyedStream(KEY))) == 3
    assert len(PoissonBatchSampler(num_samples=5, sample_rate=1.0, stream=KeyedStream(KEY))) == 1
    assert [floor_tolerant(x) for x in (49 * (1 / 49), 2.5, 0.4, 7.0)] == [1, 2, 0, 7]


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("key", "got"),
    [
        (b"k" * 31, "31 bytes"),
        (b"k" * 33, "33 bytes"),
        ("k" * 32, "a str"),
        (bytearray(32), "a bytearray"),
        (None, "a NoneType"),
    ],
)
def test_bad_keys_are_refused_by_name_without_echoing_them(key: object, got: str) -> None:
    with pytest.raises(PrivacyConfigError, match=f"noise_key must be 32 bytes.*got {got}") as info:
        check_key("noise_key", key)
    assert "kkkk" not in str(info.value)
    with pytest.raises(PrivacyConfigError, match="key must be 32 bytes"):
        KeyedStream(key)  # type: ignore[arg-type]


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_bad_rates_are_refused(rate: object) -> None:
    with pytest.raises(PrivacyConfigError, match=r"must be a number in \(0, 1\]"):
        KeyedStream(KEY).bernoulli(5, rate)  # type: ignore[arg-type]
    with pytest.raises(PrivacyConfigError, match="sample_rate="):
        PoissonBatchSampler(num_samples=5, sample_rate=rate, stream=KeyedStream(KEY))  # type: ignore[arg-type]


def test_bad_sizes_are_refused() -> None:
    stream = KeyedStream(KEY)
    with pytest.raises(PrivacyConfigError, match="n=-1"):
        stream.random_bytes(-1)
    with pytest.raises(PrivacyConfigError, match="std=-1.0"):
        stream.gaussian((2,), std=-1.0, device="cpu", dtype=torch.float32)
    with pytest.raises(PrivacyConfigError, match="num_samples=0"):
        PoissonBatchSampler(num_samples=0, sample_rate=0.5, stream=stream)
    with pytest.raises(PrivacyConfigError, match="steps=0"):
        PoissonBatchSampler(num_samples=5, sample_rate=0.5, stream=stream, steps=0)
    assert stream.position == 0  # nothing was drawn by a refused call
