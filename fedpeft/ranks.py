"""Mixed LoRA ranks across sites: the rank arithmetic of HetLoRA-style zero padding.

The server keeps the federation's largest rank ``r`` (``lora.r``). A site may declare a
smaller rank ``r_i`` in its node config (``lora-rank``); it then builds its model with rank
``r_i`` and trains the *leading block* of the global factors, the rows ``A[:r_i, :]`` and the
columns ``B[:, :r_i]``. It receives the full global adapter, keeps that block
(:func:`slice_to_rank`), trains, and pads its delta back with zeros to the global layout
(:func:`pad_to_rank`), so every site sends a vector of the same length.

Scaling: peft multiplies ``B·A`` by ``lora_alpha / r``. A rank-``r_i`` site uses
``lora_alpha_i = alpha · r_i / r`` (:func:`site_lora`), so ``alpha_i / r_i = alpha / r`` and
its ``ΔW = (alpha / r)·B[:, :r_i]·A[:r_i, :]`` is exactly the global model's ``ΔW`` with the
slots beyond ``r_i`` set to zero.

Averaging: the plain mean of padded deltas would undercount the slots only some sites train.
Rank slot ``k`` (row ``k`` of every A, column ``k`` of every B) is therefore divided by the
weight of the sites that trained it (:func:`slot_mean`); tensors without a rank dimension
(e.g. a classifier head) by the total weight; a slot no site trained gets a zero mean delta.
Each site contributes a per-slot 0/1 indicator (:func:`rank_indicator`), so the per-slot
counts are themselves a sum and compose with secure aggregation, where the indicator rides
inside the masked vector.

Pure functions on flat float32 vectors and :class:`~fedpeft.model.AdapterLayout`; no Flower,
and no torch (``fedpeft.model`` is imported for type checking only).
Which tensors a strategy trains, and how the wire carries indicators, is left to
:mod:`fedpeft.server.strategies`, :mod:`fedpeft.server.aggregation` and
:mod:`fedpeft.server.secure_aggregation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from fedpeft import constants as K
from fedpeft.config import ConfigError, LoraSettings

if TYPE_CHECKING:  # fedpeft.model imports torch; a site's light handlers import this module
    from fedpeft.model import AdapterLayout

__all__ = [
    "check_site_rank",
    "element_slots",
    "layout_rank",
    "nonzero_beyond_rank",
    "pad_to_rank",
    "rank_indicator",
    "site_lora",
    "slice_to_rank",
    "slot_mean",
    "slot_weighted_mean",
    "with_rank",
]

FloatArray = NDArray[np.float32]


def _is_a(name: str) -> bool:
    return ".lora_A." in name


def _is_b(name: str) -> bool:
    return ".lora_B." in name


def _rank_of(name: str, shape: tuple[int, ...]) -> int | None:
    """The rank dimension of a LoRA factor (A: ``(r, d_in)``, B: ``(d_out, r)``), else None."""
    if _is_a(name):
        return int(shape[0])
    if _is_b(name):
        return int(shape[1])
    return None


def layout_rank(layout: AdapterLayout) -> int:
    """The LoRA rank of ``layout`` (0 when it holds no LoRA factor).

    Raises
    ------
    ValueError
        If the LoRA factors in ``layout`` do not all have the same rank.
    """
    ranks = {
        rank
        for name, shape in zip(layout.names, layout.shapes, strict=True)
        if (rank := _rank_of(name, shape)) is not None
    }
    if len(ranks) > 1:
        raise ValueError(f"adapter layout mixes LoRA ranks {sorted(ranks)}; expected one rank")
    return ranks.pop() if ranks else 0


def with_rank(layout: AdapterLayout, rank: int) -> AdapterLayout:
    """``layout`` with every LoRA factor resized to ``rank`` (names and order unchanged)."""
    if rank < 1:
        raise ValueError(f"rank={rank} must be >= 1")
    shapes = []
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        if _is_a(name):
            shapes.append((rank, *shape[1:]))
        elif _is_b(name):
            shapes.append((shape[0], rank))
        else:
            shapes.append(shape)
    return replace(layout, shapes=tuple(shapes))


def site_lora(lora: LoraSettings, rank: int) -> LoraSettings:
    """The LoRA settings of a rank-``rank`` site: ``r = rank``, ``alpha = lora.alpha·rank/lora.r``.

    The scaling ``alpha / r`` stays that of the federation, so a site's ``ΔW`` means the same
    as the global one. A full-rank site gets ``lora`` itself (its model is unchanged).
    """
    if rank == lora.r:
        return lora
    return replace(lora, r=rank, alpha=lora.alpha * rank / lora.r)


def check_site_rank(value: object, *, full_rank: int) -> int:
    """A site's node-config ``lora-rank`` as an int in ``[1, full_rank]``.

    Parameters
    ----------
    value : object
        The node config value (an int, or a string of digits).
    full_rank : int
        The federation's rank ``lora.r``, the largest a site may declare.

    Raises
    ------
    ConfigError
        Naming the key, the value, the allowed range and the fix.
    """
    rank: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        rank = value
    elif isinstance(value, str) and value.strip().isdigit():
        rank = int(value.strip())
    if rank is None or not 1 <= rank <= full_rank:
        raise ConfigError(
            f"node config {K.NODE_LORA_RANK}={value!r} is not allowed: it must be an integer in "
            f"[1, {full_rank}] (the federation's lora.r={full_rank} is the largest rank). Start "
            f'the SuperNode with --node-config "{K.NODE_LORA_RANK}={full_rank}" or lower, or '
            f"ask the coordinator to raise lora.r."
        )
    return rank


def _blocks(layout: AdapterLayout) -> list[tuple[str, tuple[int, ...], int]]:
    """``(name, shape, offset)`` of every tensor in ``layout``."""
    out, offset = [], 0
    for name, shape, numel in zip(layout.names, layout.shapes, layout.numels, strict=True):
        out.append((name, shape, offset))
        offset += numel
    return out


def _check_rank(layout: AdapterLayout, rank: int) -> int:
    full = layout_rank(layout)
    if full and not 1 <= rank <= full:
        raise ValueError(f"rank={rank} must be in [1, {full}], the rank of the layout")
    return full


def slice_to_rank(flat: FloatArray, layout: AdapterLayout, rank: int) -> FloatArray:
    """The leading rank-``rank`` block of ``flat`` (laid out as full-rank ``layout``).

    Each A ``(r, d_in)`` keeps rows ``[:rank]``, each B ``(d_out, r)`` columns ``[:rank]``;
    other tensors are kept whole. The result is laid out as ``with_rank(layout, rank)``.
    """
    if flat.shape != (layout.size,):
        raise ValueError(f"vector of shape {flat.shape}, expected ({layout.size},)")
    full = _check_rank(layout, rank)
    if rank == full or not full:
        return flat
    parts = []
    for name, shape, offset in _blocks(layout):
        block = flat[offset : offset + int(np.prod(shape))].reshape(shape)
        if _is_a(name):
            block = block[:rank, :]
        elif _is_b(name):
            block = block[:, :rank]
        parts.append(block.reshape(-1))
    return np.concatenate(parts).astype(np.float32, copy=False)


def pad_to_rank(flat: FloatArray, layout: AdapterLayout, rank: int) -> FloatArray:
    """``flat`` (laid out as ``with_rank(layout, rank)``) zero-padded to full-rank ``layout``.

    The inverse of :func:`slice_to_rank` on the leading block; the slots ``>= rank`` are 0.
    """
    full = _check_rank(layout, rank)
    small = with_rank(layout, rank) if full else layout
    if flat.shape != (small.size,):
        raise ValueError(f"vector of shape {flat.shape}, expected ({small.size},)")
    if rank == full or not full:
        return flat
    out = np.zeros(layout.size, dtype=np.float32)
    for (name, shape, offset), (_, small_shape, small_offset) in zip(
        _blocks(layout), _blocks(small), strict=True
    ):
        block = flat[small_offset : small_offset + int(np.prod(small_shape))].reshape(small_shape)
        target = out[offset : offset + int(np.prod(shape))].reshape(shape)  # a view into out
        if _is_a(name):
            target[:rank, :] = block
        elif _is_b(name):
            target[:, :rank] = block
        else:
            target[...] = block
    return out


def rank_indicator(rank: int, full_rank: int) -> FloatArray:
    """The 0/1 slot indicator of a rank-``rank`` site, shape ``(full_rank,)``: 1 for ``k < rank``.

    Its elements are exactly 0.0 and 1.0, so under secure aggregation (values clipped to
    ``±secagg.clip_range``, which must then be ``>= 1``) their sum is the per-slot site count.
    """
    if not 0 <= rank <= full_rank:
        raise ValueError(f"rank={rank} must be in [0, {full_rank}]")
    return (np.arange(full_rank) < rank).astype(np.float32)


def element_slots(layout: AdapterLayout) -> NDArray[np.int64]:
    """The rank slot of every element of a vector laid out as ``layout``; -1 where none.

    Element ``(k, j)`` of an A ``(r, d_in)`` and ``(o, k)`` of a B ``(d_out, r)`` are slot ``k``
    (row-major order, as :func:`fedpeft.model.get_flat` lays them out).
    """
    parts = []
    for name, shape, _ in _blocks(layout):
        if _is_a(name):
            parts.append(np.repeat(np.arange(shape[0]), int(np.prod(shape[1:]))))
        elif _is_b(name):
            parts.append(np.tile(np.arange(shape[1]), shape[0]))
        else:
            parts.append(np.full(int(np.prod(shape)), -1))
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(parts).astype(np.int64)


def nonzero_beyond_rank(flat: FloatArray, layout: AdapterLayout, rank: int) -> int:
    """How many elements of ``flat`` in slots ``>= rank`` are not zero (0 for a padded delta)."""
    return int(np.count_nonzero(flat[element_slots(layout) >= rank]))


def slot_mean(
    total: NDArray[np.floating],
    *,
    slot_weights: NDArray[np.floating],
    total_weight: float,
    layout: AdapterLayout,
) -> FloatArray:
    """Divide a (weighted) sum of padded deltas by each element's own weight.

    Parameters
    ----------
    total : NDArray
        ``sum_i w_i · delta_i``, laid out as ``layout`` (full rank).
    slot_weights : NDArray
        ``sum_i w_i · indicator_i``, shape ``(layout_rank(layout),)``: the weight of the
        sites that trained each rank slot.
    total_weight : float
        ``sum_i w_i``, the divisor of elements without a rank slot (e.g. a head).
    layout : AdapterLayout
        The layout of ``total``.

    Returns
    -------
    NDArray[np.float32]
        The per-slot weighted mean; 0 where the divisor is 0 (a slot no site trained).
    """
    rank = layout_rank(layout)
    if slot_weights.shape != (rank,):
        raise ValueError(f"slot_weights of shape {slot_weights.shape}, expected ({rank},)")
    slots = element_slots(layout)
    weights = np.append(np.asarray(slot_weights, dtype=np.float64), float(total_weight))
    divisor = weights[slots]  # slot -1 (no rank dimension) picks the appended total weight
    acc = np.asarray(total, dtype=np.float64)
    safe = np.where(divisor > 0, divisor, 1.0)
    return np.where(divisor > 0, acc / safe, 0.0).astype(np.float32)


def slot_weighted_mean(
    deltas: Sequence[FloatArray],
    weights: Sequence[float],
    ranks: Sequence[int],
    layout: AdapterLayout,
) -> FloatArray:
    """Per-slot weighted mean of padded deltas from sites of ranks ``ranks``.

    Slot ``k`` is ``sum_{i: r_i > k} w_i·delta_i / sum_{i: r_i > k} w_i``; elements without a
    rank slot are ``sum_i w_i·delta_i / sum_i w_i``. When every site has the full rank this
    is exactly :func:`fedpeft.server.strategies.weighted_mean`.
    """
    if not deltas or not len(deltas) == len(weights) == len(ranks):
        raise ValueError(
            f"need one weight and one rank per delta, got {len(deltas)}, {len(weights)} and "
            f"{len(ranks)}"
        )
    full = layout_rank(layout)
    acc = np.zeros(layout.size, dtype=np.float64)
    slot_weights = np.zeros(full, dtype=np.float64)
    for delta, weight, rank in zip(deltas, weights, ranks, strict=True):
        acc += float(weight) * delta.astype(np.float64)
        slot_weights += float(weight) * rank_indicator(rank, full)
    total_weight = float(sum(weights))
    if total_weight <= 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    return slot_mean(acc, slot_weights=slot_weights, total_weight=total_weight, layout=layout)
