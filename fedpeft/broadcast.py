"""What the server sends down: only the adapter tensors a site cannot derive itself.

Every LoRA factor starts from a rule both sides know: ``lora_B`` at zero, ``lora_A`` row by
row from a generator seeded by (``seed``, tensor name, row), with peft's distribution
(Kaiming-uniform with a = √5, i.e. uniform on ±1/√fan_in). Seeding per row makes the
initialisation *rank-nested*: a site of rank ``r_i`` gets exactly the leading ``r_i`` rows of
the rank-``r`` factor, and any site can rebuild the full-rank factor without building it.

A global adapter then travels as the tensors that differ from that start (the classifier
head always, since transformers initialises it from an unseeded RNG; the biases of
``lora.bias`` always too, as their start is the base model's) plus a SHA-256 of the start
values of those left out, which the site checks after rebuilding them. Under FFA-LoRA
``lora_A`` never leaves its start, so train and evaluate messages carry only ``lora_B`` and
the head — the same bytes as the site's reply; in round 1 they carry only the head (and the
biases).

peft owns the LoRA layers and their save format; this module replaces only the values of
``lora_A`` after ``get_peft_model`` (see :func:`fedpeft.model.build_model`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:  # fedpeft.model imports this module to initialise lora_A
    from fedpeft.model import AdapterLayout

__all__ = [
    "Broadcast",
    "decode",
    "encode",
    "initial_lora_a",
    "initial_values",
    "is_derivable",
]


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def initial_lora_a(name: str, shape: tuple[int, ...], seed: int) -> NDArray[np.float32]:
    """The start of the LoRA A factor ``name`` of ``shape`` (rank, fan_in), row by row."""
    rank, fan_in = shape
    bound = 1.0 / np.sqrt(fan_in)  # peft: kaiming_uniform_(a=sqrt(5)) on a (rank, fan_in) weight
    rows = [
        np.random.default_rng([seed, _name_key(name), row]).uniform(-bound, bound, fan_in)
        for row in range(rank)
    ]
    return np.stack(rows).astype(np.float32).reshape(shape)


def is_derivable(name: str) -> bool:
    """Whether a site can rebuild the start of tensor ``name`` itself (the LoRA factors)."""
    return ".lora_A." in name or ".lora_B." in name


def initial_values(layout: AdapterLayout, names: set[str], seed: int) -> NDArray[np.float32]:
    """The start values of the derivable tensors in ``names``, flat, in layout order."""
    parts = []
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        if name not in names:
            continue
        if not is_derivable(name):
            raise ValueError(f"{name} has no start value a site can derive")
        if ".lora_A." in name:
            parts.append(initial_lora_a(name, shape, seed).reshape(-1))
        else:
            parts.append(np.zeros(int(np.prod(shape)), dtype=np.float32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def _digest(values: NDArray[np.float32]) -> str:
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).tobytes()).hexdigest()


@dataclass(frozen=True)
class Broadcast:
    """A global adapter on the wire: the values of ``sent`` plus a digest of the rest."""

    values: NDArray[np.float32]  # the sent tensors, flat, in layout order
    sent: tuple[str, ...]
    derived_digest: str  # SHA-256 of the left-out tensors' start values


def encode(flat: NDArray[np.float32], layout: AdapterLayout, *, seed: int) -> Broadcast:
    """Leave out every derivable tensor still at its start value."""
    if flat.shape != (layout.size,):
        raise ValueError(f"adapter vector has shape {flat.shape}, expected ({layout.size},)")
    tensors, offset = {}, 0
    for name, numel in zip(layout.names, layout.numels, strict=True):
        tensors[name] = flat[offset : offset + numel]
        offset += numel
    left_out = {
        name
        for name in layout.names
        if is_derivable(name)
        and np.array_equal(tensors[name], initial_values(layout, {name}, seed))
    }
    sent = tuple(n for n in layout.names if n not in left_out)
    values = np.concatenate([tensors[n] for n in sent]) if sent else np.zeros(0, np.float32)
    return Broadcast(
        values=values.astype(np.float32, copy=False),
        sent=sent,
        derived_digest=_digest(initial_values(layout, left_out, seed)),
    )


def decode(message: Broadcast, layout: AdapterLayout, *, seed: int) -> NDArray[np.float32]:
    """The full adapter: the sent values, and the left-out tensors rebuilt and checked.

    Raises
    ------
    ValueError
        If a sent name is not in ``layout``, a left-out tensor is not derivable, the sent
        values have the wrong length, or the rebuilt values do not match the server's digest
        (site and server run different fedpeft versions, seeds or LoRA settings).
    """
    known = set(layout.names)
    unknown = [n for n in message.sent if n not in known]
    if unknown:
        raise ValueError(
            f"global adapter names tensors this site's model does not have: {unknown[:3]}; "
            "site and server run different model or LoRA settings"
        )
    sent = set(message.sent)
    left_out = {n for n in layout.names if n not in sent}
    underived = sorted(n for n in left_out if not is_derivable(n))
    if underived:
        raise ValueError(
            f"global adapter leaves out {underived[:3]}, which a site cannot rebuild; "
            "site and server run different fedpeft versions"
        )
    expected = sum(n for name, n in zip(layout.names, layout.numels, strict=True) if name in sent)
    if message.values.dtype != np.float32 or message.values.shape != (expected,):
        raise ValueError(
            f"global adapter values have dtype {message.values.dtype} and shape "
            f"{message.values.shape}, expected float32 ({expected},) for {len(sent)} tensors; "
            "site and server run different model or LoRA settings"
        )
    derived = initial_values(layout, left_out, seed)
    if _digest(derived) != message.derived_digest:
        raise ValueError(
            "the LoRA factors this site rebuilt from the shared seed differ from the server's "
            "(digest mismatch): site and server run different fedpeft versions or seeds"
        )
    out = np.empty(layout.size, dtype=np.float32)
    offset = sent_at = derived_at = 0
    for name, numel in zip(layout.names, layout.numels, strict=True):
        if name in sent:
            out[offset : offset + numel] = message.values[sent_at : sent_at + numel]
            sent_at += numel
        else:
            out[offset : offset + numel] = derived[derived_at : derived_at + numel]
            derived_at += numel
        offset += numel
    return out
