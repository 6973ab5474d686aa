"""Keyed, cryptographically secure randomness for DP-SGD: Gaussian noise and Poisson sampling.

This module owns the random draws of a DP-SGD session and nothing else: a 32-byte session key
(:func:`new_session_key`), two independent sub-keys derived from it with HKDF-SHA256
(:func:`session_streams`), and a position-stateful :class:`KeyedStream` over the ChaCha20
keystream of each that yields uniforms, standard Gaussians, Gaussian noise tensors and
Bernoulli (Poisson-subsampling) draws, plus :class:`PoissonBatchSampler`, a torch batch
sampler built on it. Plugging them into Opacus (the optimizer's ``add_noise``, the data
loader) is left to :mod:`fedpeft.privacy.dp`.

Why by hand: torch's and numpy's generators are not cryptographically secure (whoever learns
their 64-bit seed, or enough outputs, can regenerate the noise and subtract it), Opacus'
``secure_mode`` needs ``torchcsprng``, which cannot be installed here, and neither
``cryptography`` nor the standard library offers secure *Gaussian* or *Bernoulli* draws. The
primitives are ``cryptography``'s ChaCha20 (as :func:`fedpeft.privacy.masking.prg_uint32`
uses it: zeros encrypted under the key) and HKDF; only the transforms from bits to numbers
are written here, each a textbook one.

Properties the callers rely on:

- **Deterministic per key.** The same key gives the same stream on every platform (the
  keystream is read as little-endian words), so a retried round repeats identical sampling
  and noise. A key must therefore serve one session only: reusing it for *another* round
  reuses its noise, which an observer of both updates can cancel.
- **Position-stateful.** Every draw continues the stream where the previous one stopped;
  no keystream byte is used twice. Each uniform costs 8 bytes, so the position after a
  sequence of draws depends only on their sizes, never on the values drawn.
- **Uniforms** are ``k * 2**-53`` for the top 53 bits ``k`` of a 64-bit word: every multiple
  of ``2**-53`` in ``[0, 1)`` is equally likely, the finest grid float64 can represent
  uniformly.
- **Gaussians** use the Box–Muller transform in float64, ``sqrt(-2 ln(1 - u1)) *
  (cos 2 pi u2, sin 2 pi u2)``: it turns two independent uniforms into two independent
  standard normals (exactly, in real arithmetic) with no rejection step, so it vectorises in
  numpy and consumes a fixed 8 bytes per output; the polar method rejects about 21% of its
  pairs, which would need a loop and make the stream position depend on the values drawn.
  ``1 - u1`` lies in ``(0, 1]``, so the logarithm is finite; the largest magnitude is
  ``sqrt(106 ln 2) ≈ 8.57`` (the normal's mass beyond it is about 1e-17 per draw,
  negligible against any δ in use). The result is cast to the parameter dtype only at the
  end. Opacus' ``secure_mode`` also sums four Gaussians against the floating-point attacks
  of arXiv:2107.10138 and 2112.05307; that is not done here, and whether rounding float64
  draws to float32 parameters defeats those attacks has not been analysed.
- **Bernoulli draws** compare uniforms with ``q``: each of ``N`` examples is included
  independently with probability ``ceil(q * 2**53) / 2**53`` (``q`` rounded up to the
  uniform grid, below ``1.2e-16`` away), which is Poisson subsampling exactly as the
  accountants assume (the sampled Gaussian mechanism), like Opacus'
  ``UniformWithReplacementSampler`` but from a secure stream.

Cost: numbers are generated on the CPU in numpy, on one core: ChaCha20 at about 1 GB/s and
the Box–Muller transcendentals at 25–50 ns per value on this kind of machine, so about
40–60 ns per Gaussian, i.e. a few ms per step for a LoRA adapter of 10^5 floats (see
``benchmarks/dp_throughput.py``) and seconds per step for 10^8 trainable floats. On a GPU site
each noise tensor is then copied host-to-device once per step, cast to the parameter dtype
first (4 bytes per float32 coordinate), and the GPU waits for the CPU draw: negligible for an
adapter, but a real cost for full fine-tuning (not measured here, no GPU was available).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray
from torch.utils.data import Sampler

from fedpeft.privacy.errors import PrivacyConfigError

__all__ = [
    "KEY_BYTES",
    "NOISE_INFO",
    "SAMPLING_INFO",
    "KeyedStream",
    "PoissonBatchSampler",
    "check_key",
    "derive_key",
    "floor_tolerant",
    "new_session_key",
    "session_streams",
]

KEY_BYTES = 32  # ChaCha20 keys and HKDF-SHA256 outputs are 32 bytes
SAMPLING_INFO = b"fedpeft/dp/sampling"  # HKDF info of the Poisson-sampling sub-key
NOISE_INFO = b"fedpeft/dp/noise"  # HKDF info of the Gaussian-noise sub-key

_WORD_BYTES = 8  # one uint64 word per uniform
_MANTISSA_BITS = 53  # float64 carries 53 significant bits
_SCALE = 2.0**-_MANTISSA_BITS
# `cryptography`'s ChaCha20 takes a 16-byte nonce: a 4-byte little-endian block counter, then
# 12 bytes of nonce. The counter covers 2**32 blocks of 64 bytes (256 GiB) and `cryptography`
# raises rather than wrap; a stream moves on to the next 12-byte nonce ("segment") there, so
# it never stops and never repeats a (key, nonce, counter) block. Each sub-key is used for one
# stream only, so counting segments from zero is safe.
_SEGMENT_BYTES = 64 * 2**32


def check_key(name: str, key: object) -> bytes:
    """Return ``key`` if it is 32 bytes, else raise naming ``name`` (never echoing the key).

    Raises
    ------
    PrivacyConfigError
        If ``key`` is not ``bytes`` of length 32.
    """
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        got = f"{len(key)} bytes" if isinstance(key, bytes) else f"a {type(key).__name__}"
        raise PrivacyConfigError(
            f"{name} must be {KEY_BYTES} bytes (e.g. secrets.token_bytes({KEY_BYTES}), or "
            f"derived from a site secret with HKDF); got {got}."
        )
    return key


def new_session_key() -> bytes:
    """A fresh random 32-byte session key from the operating system's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def derive_key(key: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (no salt) of a 32-byte ``key`` to a 32-byte sub-key bound to ``info``.

    Sub-keys with distinct ``info`` are independent: knowing one reveals nothing of another
    or of ``key``.
    """
    check_key("key", key)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(key)


class KeyedStream:
    """A ChaCha20 keystream read as uniforms, Gaussians and Bernoulli draws.

    Parameters
    ----------
    key : bytes
        32-byte ChaCha20 key, secret, for this stream only (see :func:`session_streams`).

    Notes
    -----
    Not thread-safe: draws from two threads would interleave in an unspecified order.
    """

    def __init__(self, key: bytes) -> None:
        self._key = check_key("key", key)
        self._position = 0  # keystream bytes consumed
        self._segment = -1
        self._cipher: CipherContext | None = None

    @property
    def position(self) -> int:
        """Keystream bytes consumed so far."""
        return self._position

    def random_bytes(self, n: int) -> bytes:
        """The next ``n`` bytes of the keystream."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PrivacyConfigError(f"n={n!r} must be an int >= 0")
        chunks = []
        while n > 0:
            segment, offset = divmod(self._position, _SEGMENT_BYTES)
            cipher = self._cipher
            if cipher is None or segment != self._segment:  # first draw, or counter spent
                nonce = bytes(4) + segment.to_bytes(12, "little")  # counter 0, nonce = segment
                cipher = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
                self._cipher, self._segment = cipher, segment
            take = min(n, _SEGMENT_BYTES - offset)
            chunks.append(cipher.update(bytes(take)))  # keystream = zeros encrypted
            self._position += take
            n -= take
        return b"".join(chunks)

    def uniform(self, n: int) -> NDArray[np.float64]:
        """``n`` independent uniforms on ``[0, 1)``, multiples of ``2**-53``; 8 bytes each."""
        words = np.frombuffer(self.random_bytes(_WORD_BYTES * n), dtype="<u8")
        out = (words >> np.uint64(64 - _MANTISSA_BITS)).astype(np.float64)
        out *= _SCALE  # exact: a 53-bit integer times a power of two
        return out

    def standard_normal(self, n: int) -> NDArray[np.float64]:
        """``n`` independent standard normals in float64, by Box–Muller; 8 bytes each.

        Pairs ``(u1, u2)`` of consecutive uniforms give ``r cos θ`` and ``r sin θ`` with
        ``r = sqrt(-2 ln(1 - u1))``, ``θ = 2π u2``; for odd ``n`` the last pair's sine is
        drawn and discarded (never reused).
        """
        pairs = self.uniform(2 * ((n + 1) // 2)).reshape(-1, 2)
        radius = np.sqrt(-2.0 * np.log1p(-pairs[:, 0]))  # log1p(-u) = ln(1 - u), u in [0, 1)
        theta = (2.0 * math.pi) * pairs[:, 1]
        out = np.empty((pairs.shape[0], 2), dtype=np.float64)
        np.multiply(radius, np.cos(theta), out=out[:, 0])
        np.multiply(radius, np.sin(theta), out=out[:, 1])
        return out.reshape(-1)[:n]

    def gaussian(
        self,
        shape: Sequence[int] | torch.Size,
        *,
        std: float,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """A tensor of i.i.d. ``N(0, std**2)`` values (what Opacus' ``_generate_noise`` returns).

        Drawn and scaled in float64 on the CPU, cast to ``dtype`` there, then moved to
        ``device`` (one host-to-device copy on a GPU site).

        Parameters
        ----------
        shape : sequence of int
            Shape of the result, e.g. ``p.summed_grad.shape``.
        std : float
            Standard deviation, ``>= 0`` (σ·C in DP-SGD).
        device : torch.device or str
            Where the result lives.
        dtype : torch.dtype
            A floating-point dtype, normally the parameter's.
        """
        if not (isinstance(std, (int, float)) and math.isfinite(std) and std >= 0):
            raise PrivacyConfigError(f"std={std!r} must be a finite number >= 0")
        size = tuple(int(d) for d in shape)
        values = self.standard_normal(math.prod(size))
        values *= float(std)
        return torch.from_numpy(values.reshape(size)).to(dtype=dtype).to(device=device)

    def bernoulli(self, n: int, p: float) -> NDArray[np.bool_]:
        """``n`` independent draws that are True with probability ``p`` (``u < p``)."""
        _check_rate("p", p)
        return self.uniform(n) < p

    def poisson_subsample(self, num_samples: int, sample_rate: float) -> NDArray[np.int64]:
        """Indices of a Poisson subsample: each of ``num_samples`` kept with ``sample_rate``.

        Returns the kept indices in increasing order (possibly none); costs
        ``8 * num_samples`` keystream bytes whatever is kept.
        """
        return np.flatnonzero(self.bernoulli(num_samples, sample_rate)).astype(np.int64)


def floor_tolerant(x: float) -> int:
    """``floor(x)``, forgiving the rounding of a product or quotient that should be whole.

    ``1 / (1 / 93)`` is 92.99999999999999 and ``49 * (1 / 49)`` is 0.9999999999999999 in
    float64, so a plain ``int()`` (what Opacus 1.6.0 uses for its step count and expected
    batch size) loses one; a relative slack of 1e-12 restores them and changes no value that
    is meant to be fractional.
    """
    return math.floor(x * (1.0 + 1e-12))


def _check_rate(name: str, rate: object) -> None:
    if not (
        isinstance(rate, (int, float))
        and not isinstance(rate, bool)
        and math.isfinite(rate)
        and 0.0 < rate <= 1.0
    ):
        raise PrivacyConfigError(f"{name}={rate!r} must be a number in (0, 1]")


def session_streams(key: bytes) -> tuple[KeyedStream, KeyedStream]:
    """The (sampling, noise) streams of one DP-SGD session keyed by ``key``.

    Each is keyed by its own HKDF-SHA256 sub-key (``info`` :data:`SAMPLING_INFO` and
    :data:`NOISE_INFO`), so the two are independent, and how many batches are drawn does not
    shift the noise (nor the reverse).
    """
    check_key("noise_key", key)
    return KeyedStream(derive_key(key, SAMPLING_INFO)), KeyedStream(derive_key(key, NOISE_INFO))


class PoissonBatchSampler(Sampler[list[int]]):
    """Batches of a Poisson-sampled dataset: each example kept independently with rate q.

    A drop-in for Opacus' ``UniformWithReplacementSampler`` (same length, same draws in
    distribution), drawing from a :class:`KeyedStream`. Every iteration continues the
    stream, so a second epoch gets fresh batches and the sequence of batches is determined
    by the key alone.

    Parameters
    ----------
    num_samples : int
        Dataset size N, ``>= 1``.
    sample_rate : float
        q in (0, 1].
    stream : KeyedStream
        The session's sampling stream.
    steps : int, optional
        Batches per iteration; default ``floor(1 / q)`` (at least 1), as Opacus.
    """

    def __init__(
        self,
        *,
        num_samples: int,
        sample_rate: float,
        stream: KeyedStream,
        steps: int | None = None,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise PrivacyConfigError(f"num_samples={num_samples!r} must be an int >= 1")
        _check_rate("sample_rate", sample_rate)
        if steps is not None and (
            isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
        ):
            raise PrivacyConfigError(f"steps={steps!r} must be None or an int >= 1")
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.stream = stream
        self.steps = steps if steps is not None else max(1, floor_tolerant(1.0 / sample_rate))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.stream.poisson_subsample(self.num_samples, self.sample_rate).tolist()
