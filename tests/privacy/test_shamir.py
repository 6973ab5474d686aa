"""Shamir t-of-n secret sharing: any t shares reconstruct, fewer are refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.privacy.shamir import (
    MAX_SECRET_BYTES,
    PRIME,
    SHARE_BYTES,
    ShamirError,
    Share,
    reconstruct,
    share,
)


@st.composite
def sharing_cases(draw: st.DrawFn) -> tuple[bytes, int, list[Share], list[int]]:
    secret = draw(st.binary(min_size=0, max_size=MAX_SECRET_BYTES))
    num_shares = draw(st.integers(min_value=1, max_value=12))
    threshold = draw(st.integers(min_value=1, max_value=num_shares))
    size = draw(st.integers(min_value=threshold, max_value=num_shares))
    order = draw(st.permutations(list(range(num_shares))))
    shares = share(secret, threshold=threshold, num_shares=num_shares)
    return secret, threshold, shares, order[:size]


@settings(max_examples=60, deadline=None)
@given(sharing_cases())
def test_any_threshold_subset_reconstructs(case: tuple[bytes, int, list[Share], list[int]]) -> None:
    secret, threshold, shares, subset = case
    assert reconstruct([shares[i] for i in subset], threshold=threshold) == secret


@settings(max_examples=30, deadline=None)
@given(sharing_cases())
def test_fewer_than_threshold_raises(case: tuple[bytes, int, list[Share], list[int]]) -> None:
    _, threshold, shares, subset = case
    with pytest.raises(ShamirError, match=f"threshold={threshold}"):
        reconstruct([shares[i] for i in subset[: threshold - 1]], threshold=threshold)


def test_threshold_minus_one_shares_do_not_determine_the_secret() -> None:
    # Interpolating t-1 shares as if the threshold were t-1 gives an unrelated value.
    secret = bytes(range(32))
    shares = share(secret, threshold=3, num_shares=5)
    try:
        value = reconstruct(shares[:2], threshold=2)
    except ShamirError:
        return  # nearly always: the result is not even a valid encoding
    assert value != secret


def test_leading_zero_bytes_and_empty_secret_survive() -> None:
    for secret in (b"\x00\x00\x01", b"", bytes(MAX_SECRET_BYTES)):
        assert reconstruct(share(secret, threshold=2, num_shares=3)[1:], threshold=2) == secret


def test_duplicate_indices_are_rejected() -> None:
    shares = share(b"secret", threshold=2, num_shares=3)
    with pytest.raises(ShamirError, match=r"duplicate share indices \[1\]"):
        reconstruct([shares[0], shares[0]], threshold=2)


def test_inconsistent_extra_share_is_detected() -> None:
    first = share(b"a" * 32, threshold=2, num_shares=3)
    second = share(b"b" * 32, threshold=2, num_shares=3)
    with pytest.raises(ShamirError, match="inconsistent"):
        reconstruct([first[0], first[1], second[2]], threshold=2)


def test_share_bytes_round_trip() -> None:
    for item in share(b"\xff" * 32, threshold=3, num_shares=4):
        data = item.to_bytes()
        assert len(data) == SHARE_BYTES
        assert Share.from_bytes(data) == item
    with pytest.raises(ShamirError, match=f"{SHARE_BYTES} bytes, got 3"):
        Share.from_bytes(b"abc")
    with pytest.raises(ShamirError, match="share value"):
        Share.from_bytes((1).to_bytes(2, "big") + (PRIME + 1).to_bytes(66, "big"))
    with pytest.raises(ShamirError, match="index=0"):
        Share.from_bytes(bytes(SHARE_BYTES))


@pytest.mark.parametrize(
    ("secret", "threshold", "num_shares", "message"),
    [
        (b"x" * (MAX_SECRET_BYTES + 1), 2, 3, "length <= 64"),
        (b"x", 4, 3, "threshold=4"),
        (b"x", 0, 3, "threshold=0"),
        (b"x", 1, 0, "num_shares=0"),
    ],
)
def test_bad_parameters_are_rejected(
    secret: bytes, threshold: int, num_shares: int, message: str
) -> None:
    with pytest.raises(ShamirError, match=message):
        share(secret, threshold=threshold, num_shares=num_shares)


def test_shares_are_randomised() -> None:
    # The same secret shared twice gives different shares (fresh polynomial coefficients).
    assert share(b"k" * 32, threshold=2, num_shares=2) != share(
        b"k" * 32, threshold=2, num_shares=2
    )
