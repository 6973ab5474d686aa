"""The flat wire form of SecAgg+ messages: exact round trips and strict rejection."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedpeft.privacy.quantize import QuantizationParams
from fedpeft.privacy.secagg import (
    EncryptedShares,
    MaskedVector,
    MaskedVectorRequest,
    PublicKeys,
    SecAggProtocolError,
    SetupRequest,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskShares,
)
from fedpeft.privacy.secagg_wire import decode, encode

BIG = 2**64 - 1  # Flower node ids are unsigned 64-bit
MESSAGES: list[Any] = [
    SetupRequest(
        round_id=BIG,
        node_id=3,
        neighbours=(1, BIG),
        threshold=2,
        vector_length=5,
        quantization=QuantizationParams(clip=0.5, num_summands=3),
    ),
    PublicKeys(round_id=7, node_id=BIG, encryption_key=b"e" * 32, mask_key=b"m" * 32),
    ShareKeysRequest(
        round_id=7, node_id=1, encryption_keys={BIG: b"a", 2: b"b"}, mask_keys={BIG: b"c", 2: b"d"}
    ),
    EncryptedShares(round_id=7, node_id=1, ciphertexts={}),
    MaskedVectorRequest(round_id=7, node_id=1, ciphertexts={2: b"\x00" * 164}),
    UnmaskRequest(round_id=7, node_id=1, survived=(1, 2), dropped=()),
    UnmaskShares(
        round_id=7, node_id=1, self_mask_shares={1: b"x", 2: b"y"}, mask_key_shares={BIG: b"z"}
    ),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Any) -> None:
    wire = encode(message)
    assert wire.arrays == {}
    assert all(isinstance(v, int | float | bytes | list) for v in wire.fields.values())
    assert decode(type(message), wire.fields) == message


def test_masked_vector_travels_as_a_uint32_array() -> None:
    vector = np.array([0, 1, 2**32 - 1], dtype=np.uint32)
    wire = encode(MaskedVector(round_id=7, node_id=BIG, vector=vector))
    assert wire.fields == {"round_id": 7, "node_id": BIG} and list(wire.arrays) == ["vector"]
    back = decode(MaskedVector, wire.fields, wire.arrays)
    assert back.node_id == BIG and np.array_equal(back.vector, vector)


def test_maps_become_parallel_sorted_lists() -> None:
    fields = encode(MESSAGES[2]).fields
    assert fields["encryption_keys.nodes"] == [2, BIG]
    assert fields["encryption_keys.values"] == [b"b", b"a"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"extra": 1}, "missing or unexpected"),
        ({"round_id": None}, "missing or unexpected"),
        ({"round_id": True}, "'round_id' is a bool; expected an int"),
        ({"round_id": 1.0}, "'round_id' is a float; expected an int"),
        ({"encryption_keys.nodes": [2]}, "must pair distinct node ids with one value each"),
        ({"encryption_keys.nodes": [2, 2]}, "must pair distinct node ids"),
        ({"encryption_keys.nodes": ["2", "3"]}, "expected a list of ints"),
        ({"mask_keys.values": [b"c", "d"]}, "expected a list of bytes"),
    ],
)
def test_malformed_fields_are_rejected(change: dict[str, Any], match: str) -> None:
    fields: dict[str, Any] = dict(encode(MESSAGES[2]).fields)
    for key, value in change.items():
        if value is None:
            del fields[key]
        else:
            fields[key] = value
    with pytest.raises(SecAggProtocolError, match=match):
        decode(ShareKeysRequest, fields)


def test_bad_quantization_is_a_protocol_error() -> None:
    fields: dict[str, Any] = dict(encode(MESSAGES[0]).fields)
    fields["quantization.clip"] = -1.0
    with pytest.raises(SecAggProtocolError, match="clip=-1.0 is not allowed"):
        decode(SetupRequest, fields)


@pytest.mark.parametrize(
    "vector",
    [
        np.zeros(3, dtype=np.float32),
        np.zeros(3, dtype=np.int64),
        np.zeros((1, 3), dtype=np.uint32),
        [0, 1, 2],
    ],
)
def test_masked_vector_must_be_one_dimensional_uint32(vector: Any) -> None:
    with pytest.raises(SecAggProtocolError, match="expected a 1-D uint32 array"):
        decode(MaskedVector, {"round_id": 7, "node_id": 1}, {"vector": vector})


def test_masked_vector_without_its_array_is_rejected() -> None:
    with pytest.raises(SecAggProtocolError, match="missing or unexpected"):
        decode(MaskedVector, {"round_id": 7, "node_id": 1})
