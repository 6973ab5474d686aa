"""SecAgg+ messages as flat dicts of plain values, for any transport.

This module owns how a message dataclass of :mod:`fedpeft.privacy.secagg_messages` is flattened
into a :class:`WireMessage`: named values that a typical record format carries (ints, floats,
bytes, lists of ints or of bytes) plus named uint32 numpy vectors, and how what arrives is
checked and turned back into a message. Flower's glue (``fedpeft.server.secure_aggregation``
and ``fedpeft.client.secure_aggregation``) puts the fields into a ``ConfigRecord`` and the
vectors into an ``ArrayRecord``; the protocol state machines never see a transport.

Names are the dataclass field names; a ``Mapping[int, bytes]`` field ``f`` becomes two parallel
lists ``f.nodes`` and ``f.values`` (node ids are unsigned 64-bit, so they stay ints rather than
dict keys), and the :class:`~fedpeft.privacy.quantize.QuantizationParams` field ``f`` becomes
``f.clip``, ``f.num_summands`` and ``f.bits``. :func:`decode` rejects a missing, extra or
mistyped entry with :class:`~fedpeft.privacy.secagg_messages.SecAggProtocolError`, so a
malformed message from the network never reaches a state machine as a half-built object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar

import numpy as np
from numpy.typing import NDArray

from fedpeft.privacy.quantize import QuantizationParams
from fedpeft.privacy.secagg_messages import (
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

__all__ = ["FieldValue", "WireMessage", "decode", "encode"]

FieldValue = int | float | bytes | list[int] | list[bytes]

Message = TypeVar(
    "Message",
    SetupRequest,
    PublicKeys,
    ShareKeysRequest,
    EncryptedShares,
    MaskedVectorRequest,
    MaskedVector,
    UnmaskRequest,
    UnmaskShares,
)

# Field annotation (a string: the dataclasses use postponed annotations) -> wire kind.
_KINDS = {
    "int": "int",
    "tuple[int, ...]": "ints",
    "bytes": "bytes",
    "Mapping[int, bytes]": "byte_map",
    "QuantizationParams": "quantization",
    "NDArray[np.uint32]": "vector",
}
_MESSAGES = (
    SetupRequest,
    PublicKeys,
    ShareKeysRequest,
    EncryptedShares,
    MaskedVectorRequest,
    MaskedVector,
    UnmaskRequest,
    UnmaskShares,
)


def _field_kinds(cls: type) -> dict[str, str]:
    kinds = {}
    for field in dataclasses.fields(cls):
        annotation = str(field.type)
        if annotation not in _KINDS:  # a new field type needs a wire form here
            raise TypeError(f"{cls.__name__}.{field.name}: no wire form for {annotation!r}")
        kinds[field.name] = _KINDS[annotation]
    return kinds


_FIELDS: dict[type, dict[str, str]] = {cls: _field_kinds(cls) for cls in _MESSAGES}


def _wire_names(name: str, kind: str) -> tuple[str, ...]:
    if kind == "byte_map":
        return (f"{name}.nodes", f"{name}.values")
    if kind == "quantization":
        return (f"{name}.clip", f"{name}.num_summands", f"{name}.bits")
    return (name,)


@dataclass(frozen=True, eq=False)
class WireMessage:
    """A protocol message, flattened.

    Attributes
    ----------
    fields : dict[str, FieldValue]
        Ints, floats, bytes and lists of ints or bytes (e.g. a Flower ``ConfigRecord``).
    arrays : dict[str, NDArray[np.uint32]]
        1-D uint32 vectors (e.g. a Flower ``ArrayRecord``); only :class:`MaskedVector` has one,
        ``"vector"``.
    """

    fields: dict[str, FieldValue]
    arrays: dict[str, NDArray[np.uint32]]


def encode(message: Message) -> WireMessage:
    """Flatten a protocol message (see the module docstring).

    Parameters
    ----------
    message : SetupRequest, PublicKeys, ShareKeysRequest, EncryptedShares, \
MaskedVectorRequest, MaskedVector, UnmaskRequest or UnmaskShares
        The message to send.

    Returns
    -------
    WireMessage
        Its scalar and list entries, and its uint32 vectors.
    """
    fields: dict[str, FieldValue] = {}
    arrays: dict[str, NDArray[np.uint32]] = {}
    for name, kind in _FIELDS[type(message)].items():
        value = getattr(message, name)
        if kind == "ints":
            fields[name] = [int(v) for v in value]
        elif kind == "byte_map":
            nodes = sorted(value)
            fields[f"{name}.nodes"] = [int(node) for node in nodes]
            fields[f"{name}.values"] = [bytes(value[node]) for node in nodes]
        elif kind == "quantization":
            fields[f"{name}.clip"] = float(value.clip)
            fields[f"{name}.num_summands"] = int(value.num_summands)
            fields[f"{name}.bits"] = int(value.bits)
        elif kind == "vector":
            arrays[name] = value
        else:  # int, bytes: already a wire value
            fields[name] = value
    return WireMessage(fields=fields, arrays=arrays)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _problem(cls: type, name: str, value: object, expected: str) -> SecAggProtocolError:
    return SecAggProtocolError(
        f"{cls.__name__} entry {name!r} is a {type(value).__name__}; expected {expected} "
        "(the sender does not speak this SecAgg+ wire format)"
    )


def _int_list(cls: type, name: str, value: object) -> list[int]:
    if not isinstance(value, list | tuple) or not all(_is_int(v) for v in value):
        raise _problem(cls, name, value, "a list of ints")
    return [int(v) for v in value]


def _decode_field(cls: type, name: str, kind: str, fields: Mapping[str, object]) -> Any:
    if kind == "int":
        value = fields[name]
        if not _is_int(value):
            raise _problem(cls, name, value, "an int")
        return value
    if kind == "ints":
        return tuple(_int_list(cls, name, fields[name]))
    if kind == "bytes":
        value = fields[name]
        if not isinstance(value, bytes):
            raise _problem(cls, name, value, "bytes")
        return value
    if kind == "byte_map":
        nodes = _int_list(cls, f"{name}.nodes", fields[f"{name}.nodes"])
        values = fields[f"{name}.values"]
        if not isinstance(values, list | tuple) or not all(isinstance(v, bytes) for v in values):
            raise _problem(cls, f"{name}.values", values, "a list of bytes")
        if len(values) != len(nodes) or len(set(nodes)) != len(nodes):
            raise SecAggProtocolError(
                f"{cls.__name__} entries {name}.nodes ({len(nodes)} ids, "
                f"{len(set(nodes))} distinct) and {name}.values ({len(values)}) must pair "
                "distinct node ids with one value each"
            )
        return dict(zip(nodes, values, strict=True))
    if kind == "quantization":
        clip, summands, bits = (fields[key] for key in _wire_names(name, kind))
        if not isinstance(clip, int | float) or isinstance(clip, bool):
            raise _problem(cls, f"{name}.clip", clip, "a float")
        if not _is_int(summands) or not _is_int(bits):
            raise _problem(cls, f"{name}.num_summands/bits", (summands, bits), "two ints")
        try:
            return QuantizationParams(clip=float(clip), num_summands=summands, bits=bits)
        except ValueError as error:
            raise SecAggProtocolError(f"{cls.__name__}: {error}") from error
    value = fields[name]  # kind == "vector"
    if not isinstance(value, np.ndarray) or value.dtype != np.uint32 or value.ndim != 1:
        raise SecAggProtocolError(
            f"{cls.__name__} entry {name!r} has type {type(value).__name__}, dtype "
            f"{getattr(value, 'dtype', None)} and shape {getattr(value, 'shape', None)}; "
            "expected a 1-D uint32 array (4 bytes per parameter)"
        )
    return value


def decode(
    cls: type[Message],
    fields: Mapping[str, object],
    arrays: Mapping[str, object] | None = None,
) -> Message:
    """Check what arrived from the network and rebuild the message ``cls``.

    Parameters
    ----------
    cls : type
        The message class the receiver expects at this stage.
    fields : Mapping[str, object]
        Exactly the entries of :attr:`WireMessage.fields` that :func:`encode` produces for
        ``cls``.
    arrays : Mapping[str, object], optional
        Exactly its :attr:`WireMessage.arrays`, as numpy arrays; default none.

    Returns
    -------
    Message
        An instance of ``cls``; its protocol meaning (round, sender, sizes) is checked by the
        state machine that receives it.

    Raises
    ------
    SecAggProtocolError
        If an entry is missing, unexpected or of the wrong type.
    """
    kinds = _FIELDS[cls]
    arrays = {} if arrays is None else arrays
    expected = {w for n, k in kinds.items() if k != "vector" for w in _wire_names(n, k)}
    expected_arrays = {name for name, kind in kinds.items() if kind == "vector"}
    if set(fields) != expected or set(arrays) != expected_arrays:
        raise SecAggProtocolError(
            f"{cls.__name__} has entries {sorted(fields)} and arrays {sorted(arrays)}; expected "
            f"exactly {sorted(expected)} and {sorted(expected_arrays)} (missing or unexpected)"
        )
    merged = {**fields, **arrays}
    values = {name: _decode_field(cls, name, kind, merged) for name, kind in kinds.items()}
    return cls(**values)
