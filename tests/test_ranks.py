"""Rank arithmetic for mixed LoRA ranks, against hand-computed shapes, sums and means."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft import constants as K
from fedpeft.config import ConfigError, LoraSettings
from fedpeft.model import AdapterLayout, split_flat
from fedpeft.ranks import (
    check_site_rank,
    element_slots,
    layout_rank,
    nonzero_beyond_rank,
    pad_to_rank,
    rank_indicator,
    site_lora,
    slice_to_rank,
    slot_mean,
    slot_weighted_mean,
    with_rank,
)
from fedpeft.server.strategies import weighted_mean

A, B, HEAD = "m.q.lora_A.default.weight", "m.q.lora_B.default.weight", "m.cls.modules_to_save.w"
RANK, D_IN, D_OUT = 4, 3, 2
LAYOUT = AdapterLayout(names=(A, B, HEAD), shapes=((RANK, D_IN), (D_OUT, RANK), (2,)))


def _flat(a: np.ndarray, b: np.ndarray, head: np.ndarray) -> np.ndarray:
    return np.concatenate([a.ravel(), b.ravel(), head.ravel()]).astype(np.float32)


def test_layout_rank_and_with_rank() -> None:
    assert layout_rank(LAYOUT) == 4
    assert layout_rank(LAYOUT.subset(lambda n: n != A)) == 4  # FFA sends only B and the head
    assert layout_rank(LAYOUT.subset(lambda n: n == HEAD)) == 0
    small = with_rank(LAYOUT, 2)
    assert small.names == LAYOUT.names
    assert small.shapes == ((2, D_IN), (D_OUT, 2), (2,))
    assert small.size == 2 * 3 + 2 * 2 + 2 == 12
    mixed = AdapterLayout(names=(A, B), shapes=((4, 3), (2, 3)))
    with pytest.raises(ValueError, match="mixes LoRA ranks"):
        layout_rank(mixed)


def test_slice_takes_rows_of_a_and_columns_of_b() -> None:
    a = np.arange(12, dtype=np.float32).reshape(4, 3)  # rows 0..3
    b = 100 + np.arange(8, dtype=np.float32).reshape(2, 4)  # [[100..103], [104..107]]
    head = np.array([7.0, 8.0], np.float32)
    got = split_flat(slice_to_rank(_flat(a, b, head), LAYOUT, 2), with_rank(LAYOUT, 2))
    np.testing.assert_array_equal(got[A], [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(got[B], [[100, 101], [104, 105]])
    np.testing.assert_array_equal(got[HEAD], [7, 8])


def test_pad_places_the_block_and_zeros_the_rest() -> None:
    small = with_rank(LAYOUT, 1)
    flat = _flat(np.array([[1.0, 2.0, 3.0]]), np.array([[4.0], [5.0]]), np.array([6.0, 7.0]))
    got = split_flat(pad_to_rank(flat, LAYOUT, 1), LAYOUT)
    expected_a = np.zeros((4, 3))
    expected_a[0] = [1, 2, 3]
    np.testing.assert_array_equal(got[A], expected_a)
    np.testing.assert_array_equal(got[B], [[4, 0, 0, 0], [5, 0, 0, 0]])
    np.testing.assert_array_equal(got[HEAD], [6, 7])
    assert flat.shape == (small.size,) == (3 + 2 + 2,)


@pytest.mark.parametrize("rank", [1, 2, 3, 4])
def test_padding_then_slicing_is_identity(rank: int) -> None:
    rng = np.random.default_rng(rank)
    small = rng.standard_normal(with_rank(LAYOUT, rank).size).astype(np.float32)
    padded = pad_to_rank(small, LAYOUT, rank)
    assert padded.shape == (LAYOUT.size,)
    np.testing.assert_array_equal(slice_to_rank(padded, LAYOUT, rank), small)
    assert nonzero_beyond_rank(padded, LAYOUT, rank) == 0
    assert nonzero_beyond_rank(padded, LAYOUT, 0) == np.count_nonzero(padded[:-2])


def test_rank_indicator_and_element_slots() -> None:
    np.testing.assert_array_equal(rank_indicator(2, 4), [1, 1, 0, 0])
    assert rank_indicator(4, 4).dtype == np.float32
    # A (4, 3): three elements per row → slots 0,0,0,1,1,1,…; B (2, 4): 0,1,2,3,0,1,2,3; head -1
    expected = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] + [0, 1, 2, 3] * 2 + [-1, -1]
    np.testing.assert_array_equal(element_slots(LAYOUT), expected)


def test_slot_mean_by_hand() -> None:
    # Ranks 4, 2, 1 with weights 1, 2, 3 → slot weights [6, 3, 1, 1], head weight 6.
    ones = [
        pad_to_rank(np.ones(with_rank(LAYOUT, r).size, np.float32), LAYOUT, r) for r in (4, 2, 1)
    ]
    deltas = [1.0 * ones[0], 10.0 * ones[1], 100.0 * ones[2]]
    got = split_flat(slot_weighted_mean(deltas, [1, 2, 3], [4, 2, 1], LAYOUT), LAYOUT)
    slot = [
        (1 * 1 + 2 * 10 + 3 * 100) / 6,  # all three sites
        (1 * 1 + 2 * 10) / 3,  # ranks 4 and 2
        1.0,  # rank 4 only
        1.0,
    ]
    np.testing.assert_allclose(got[A], np.repeat(np.array(slot)[:, None], 3, axis=1), rtol=1e-6)
    np.testing.assert_allclose(got[B], np.tile(slot, (2, 1)), rtol=1e-6)
    np.testing.assert_allclose(got[HEAD], [(1 + 20 + 300) / 6] * 2, rtol=1e-6)


def test_slot_mean_leaves_untrained_slots_at_zero() -> None:
    total = np.arange(LAYOUT.size, dtype=np.float64)
    got = split_flat(
        slot_mean(
            total, slot_weights=np.array([2.0, 1.0, 0.0, 0.0]), total_weight=2, layout=LAYOUT
        ),
        LAYOUT,
    )
    np.testing.assert_allclose(got[A][:, 0], [0 / 2, 3 / 1, 0, 0])
    np.testing.assert_allclose(got[B][1], [16 / 2, 17 / 1, 0, 0])
    np.testing.assert_allclose(got[HEAD], [20 / 2, 21 / 2])
    with pytest.raises(ValueError, match="slot_weights of shape"):
        slot_mean(total, slot_weights=np.ones(3), total_weight=2, layout=LAYOUT)


def test_full_ranks_give_exactly_the_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    deltas = [rng.standard_normal(LAYOUT.size).astype(np.float32) for _ in range(3)]
    got = slot_weighted_mean(deltas, [60, 90, 120], [4, 4, 4], LAYOUT)
    np.testing.assert_array_equal(got, weighted_mean(deltas, [60, 90, 120]))


def test_site_lora_keeps_the_scaling() -> None:
    lora = LoraSettings(r=8, alpha=16)
    assert site_lora(lora, 8) is lora
    small = site_lora(lora, 2)
    assert small.r == 2 and small.alpha / small.r == lora.alpha / lora.r == 2.0
    assert site_lora(LoraSettings(r=8, alpha=12), 3).alpha == pytest.approx(4.5)


@pytest.mark.parametrize("value", [0, 9, -1, "x", "2.5", 2.0, True])
def test_a_bad_site_rank_names_key_value_range_and_fix(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        check_site_rank(value, full_rank=8)
    message = str(info.value)
    assert f"{K.NODE_LORA_RANK}={value!r}" in message and "[1, 8]" in message
    assert "--node-config" in message


def test_a_good_site_rank_is_an_int() -> None:
    assert check_site_rank(4, full_rank=8) == 4
    assert check_site_rank("8", full_rank=8) == 8
