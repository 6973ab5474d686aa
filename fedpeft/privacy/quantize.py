"""Fixed-point quantisation of float vectors into the ring Z_{2^32} for secure aggregation.

This module owns the map between a site's float update and the unsigned 32-bit integers that
secure aggregation masks and sums, and the inverse map for the *sum* of several such vectors.
It leaves masking to :mod:`fedpeft.privacy.masking` and the protocol to
:mod:`fedpeft.privacy.secagg`.

Each value ``x`` is clipped to ``[-clip, clip]``, shifted to ``x + clip`` in ``[0, 2 * clip]``,
scaled by ``scale`` and rounded *stochastically* to one of the two nearest integers, so the
quantised value is an unbiased estimate of ``(x + clip) * scale``. The scale is chosen so that
the sum of ``num_summands`` quantised vectors never reaches ``2^bits`` (with ``bits <= 32``), so
the sum computed modulo ``2^32`` equals the true integer sum and dequantisation is exact up to
rounding: ``sum_x = sum_q / scale - count * clip``.

Written by hand because no library provides this: Flower's own SecAgg+ quantises with its own
helpers into int64 vectors, and ``cryptography`` provides primitives only. The random generator
is passed in explicitly; a numpy ``Generator`` is adequate here because stochastic rounding is
not a secrecy primitive (its output is masked afterwards; only unbiasedness matters).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["QuantizationParams", "QuantizedVector", "dequantize_sum", "quantize"]

_MAX_BITS = 32  # the masking ring is Z_{2^32}: uint32 vectors, 4 bytes per parameter


@dataclass(frozen=True)
class QuantizationParams:
    """Fixed-point parameters shared by every site and the server in one round.

    Parameters
    ----------
    clip : float
        Values are clipped to ``[-clip, clip]`` before quantisation; must be finite and > 0.
    num_summands : int
        The largest number of quantised vectors that will be summed (the number of sites in
        the round); the scale leaves room so that their sum cannot overflow. Must be >= 1.
    bits : int, default 32
        The sum of ``num_summands`` vectors stays below ``2^bits``; ``1 <= bits <= 32``.

    Attributes
    ----------
    max_level : int
        Largest quantised value of one element: ``floor((2^bits - 1) / num_summands)``.
    scale : float
        Quantisation levels per unit: ``max_level / (2 * clip)``. The rounding error of one
        element of one summand is below ``1 / scale``.
    """

    clip: float
    num_summands: int
    bits: int = _MAX_BITS

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.clip, (int, float)) and np.isfinite(self.clip) and self.clip > 0):
            problems.append(
                f"clip={self.clip!r} is not allowed; it must be a finite float > 0 "
                "(set it to the largest absolute update value you expect, e.g. 1.0)"
            )
        if not isinstance(self.num_summands, int) or self.num_summands < 1:
            problems.append(
                f"num_summands={self.num_summands!r} is not allowed; it must be an int >= 1 "
                "(set it to the number of sites in the round)"
            )
        if not isinstance(self.bits, int) or not 1 <= self.bits <= _MAX_BITS:
            problems.append(
                f"bits={self.bits!r} is not allowed; it must be an int in [1, {_MAX_BITS}] "
                "(use the default 32)"
            )
        elif isinstance(self.num_summands, int) and self.num_summands >= 2**self.bits:
            problems.append(
                f"num_summands={self.num_summands} leaves no quantisation level with "
                f"bits={self.bits}; it must be < 2^bits (raise bits or lower num_summands)"
            )
        if problems:
            raise ValueError("invalid QuantizationParams: " + "; ".join(problems))

    @property
    def max_level(self) -> int:
        """Largest quantised value of one element (integer, so rounding cannot exceed it)."""
        return int((2**self.bits - 1) // self.num_summands)

    @property
    def scale(self) -> float:
        """Quantisation levels per unit of the float value."""
        return self.max_level / (2.0 * self.clip)


@dataclass(frozen=True, eq=False)
class QuantizedVector:
    """The result of :func:`quantize`.

    Attributes
    ----------
    values : NDArray[np.uint32]
        Quantised vector, shape ``(L,)``, every element in ``[0, params.max_level]``.
    num_clipped : int
        How many input elements lay outside ``[-clip, clip]`` and were clipped.
    """

    values: NDArray[np.uint32]
    num_clipped: int


def quantize(
    values: NDArray[np.floating], params: QuantizationParams, *, rng: np.random.Generator
) -> QuantizedVector:
    """Clip, shift, scale and stochastically round a float vector into ``[0, max_level]``.

    Parameters
    ----------
    values : NDArray[np.floating]
        The update, shape ``(L,)``; any float dtype (computed in float64).
    params : QuantizationParams
        The round's quantisation parameters.
    rng : numpy.random.Generator
        Source of the rounding randomness (not a secrecy primitive; see the module docstring).

    Returns
    -------
    QuantizedVector
        The uint32 vector and the number of clipped elements.

    Raises
    ------
    ValueError
        If ``values`` is not a 1-D float array or contains NaN.
    """
    array = np.asarray(values)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"values has shape {array.shape} and dtype {array.dtype}; a 1-D float array is "
            "required (flatten the update and cast it to float32 first)"
        )
    x = array.astype(np.float64)
    if np.isnan(x).any():
        raise ValueError(
            f"values contains {int(np.isnan(x).sum())} NaN element(s); NaN cannot be quantised "
            "(check the local training for divergence before aggregation)"
        )
    clip = float(params.clip)
    num_clipped = int(np.count_nonzero((x < -clip) | (x > clip)))
    shifted = (np.clip(x, -clip, clip) + clip) * params.scale  # in [0, max_level] up to rounding
    np.clip(shifted, 0.0, float(params.max_level), out=shifted)  # float error at the ends
    floor = np.floor(shifted)
    rounded = floor + (rng.random(x.shape[0]) < (shifted - floor))  # unbiased rounding
    return QuantizedVector(values=rounded.astype(np.uint32), num_clipped=num_clipped)


def dequantize_sum(
    total: NDArray[np.uint32], params: QuantizationParams, *, count: int
) -> NDArray[np.float64]:
    """Map the modular sum of ``count`` quantised vectors back to the float sum.

    Parameters
    ----------
    total : NDArray[np.uint32]
        Sum modulo ``2^32`` of ``count`` outputs of :func:`quantize`, shape ``(L,)``.
    params : QuantizationParams
        The parameters the vectors were quantised with.
    count : int
        How many vectors were summed, ``1 <= count <= params.num_summands``; each contributed
        an offset of ``clip`` per element, which is removed here.

    Returns
    -------
    NDArray[np.float64]
        The float sum; each element is within ``count / params.scale`` of the clipped sum.

    Raises
    ------
    ValueError
        If ``count`` is out of range or ``total`` is not a 1-D uint32 array.
    """
    if not isinstance(count, int) or not 1 <= count <= params.num_summands:
        raise ValueError(
            f"count={count!r} is not allowed; it must be an int in [1, {params.num_summands}] "
            "(the number of vectors actually summed, at most num_summands)"
        )
    array = np.asarray(total)
    if array.ndim != 1 or array.dtype != np.uint32:
        raise ValueError(
            f"total has shape {array.shape} and dtype {array.dtype}; a 1-D uint32 array is "
            "required (sum the quantised vectors with uint32 arithmetic)"
        )
    return array.astype(np.float64) / params.scale - count * float(params.clip)
