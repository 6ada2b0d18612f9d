"""Seeded Gaussian noise that replays other tools' seeds: torch's CPU generator, A1111's "NV" source, MLX's.

A seed only means a picture together with the generator that turns it into numbers. Three sources:

- ``"cpu"``: ``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` on CPU: what diffusers
  draws with a CPU generator and ComfyUI for its initial noise (on the CPU whatever the GPU).
- ``"nv"``: AUTOMATIC1111's ``RNG: NV``, its NumPy port of torch.randn on an NVIDIA GPU (Philox 4x32-10).
- ``"mlx"``: ``mx.random.normal`` as this package drew noise before these sources existed, so the PNGs
  made then replay.

Shapes are in torch order (``(B, C, H, W)`` for a latent) and every source returns float32 NumPy arrays
in that order; `latent_noise` hands a draw to the pipeline in its NHWC layout. MLX is imported only by
the ``"mlx"`` source and `latent_noise`, so front ends can import the names and checks without it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..defaults import MAX_SEED

if TYPE_CHECKING:
    import mlx.core as mx

RNG_SOURCES = ("cpu", "nv", "mlx")
SEED_LIMIT = MAX_SEED + 1  # seeds are integers in [0, SEED_LIMIT), as torch.Generator.manual_seed accepts them


def check_rng(rng: object) -> str:
    """The noise source's name, or a ValueError naming the valid ones."""
    if rng not in RNG_SOURCES:
        raise ValueError(f"unknown rng {rng!r}; valid: {', '.join(RNG_SOURCES)}")
    return rng  # type: ignore[return-value]


def check_seed(seed: object) -> int:
    """The seed as an int in [0, MAX_SEED], or a TypeError/ValueError saying what is wrong."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed}")
    return seed


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(operator.index(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must not have negative sizes, got {shape}")
    return shape


# ---------------------------------------------------------------------------------------------------
# "cpu": torch's CPUGeneratorImpl (MT19937) and its normal_ kernel
# (aten/src/ATen/native/cpu/DistributionTemplates.h, core/DistributionsHelper.h, core/TransformationHelper.h,
# core/MT19937RNGEngine.h in torch 2.13)
# ---------------------------------------------------------------------------------------------------


_F32 = np.float32
_F64 = np.float64


def _fma(a, b, c) -> np.ndarray:
    # float32 fused multiply-add: the product of two float32 is exact in float64, one rounding of the sum
    # to float64, then to float32 (a double rounding that can differ from a true FMA with odds ~2**-29).
    return (np.asarray(a, _F64) * np.asarray(b, _F64) + np.asarray(c, _F64)).astype(_F32)


# Cephes' single-precision coefficients, as avx_mathfun.h spells them.
_LOG_P = [_F32(p) for p in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1)]
_LOG_P += [_F32(p) for p in (-1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)]
_LOG_Q1, _LOG_Q2, _SQRTHF = _F32(-2.12194440e-4), _F32(0.693359375), _F32(0.707106781186547524)
_DP = (_F32(-0.78515625), _F32(-2.4187564849853515625e-4), _F32(-3.77489497744594108e-8))
_SIN_P = (_F32(-1.9515295891e-4), _F32(8.3321608736e-3), _F32(-1.6666654611e-1))
_COS_P = (_F32(2.443315711809948e-005), _F32(-1.388731625493765e-003), _F32(4.166664568298827e-002))
_FOUR_OVER_PI, _TWO_PI, _HALF, _ONE = _F32(1.27323954473516), _F32(2.0 * math.pi), _F32(0.5), _F32(1.0)


def _log256_ps(x: np.ndarray) -> np.ndarray:
    """avx_mathfun.h's log256_ps for x in (0, 1], with the multiply-adds GCC fuses into FMAs in torch's build."""
    bits = x.view(np.int32)
    e = ((bits >> 23) - 127).astype(_F32) + _ONE
    m = ((bits & ~0x7F800000) | _HALF.view(np.int32)).view(_F32)  # mantissa in [0.5, 1)
    small = m < _SQRTHF
    e = e - small.astype(_F32)
    m = (m - _ONE) + np.where(small, m, _F32(0))
    z = m * m
    y = np.full_like(m, _LOG_P[0])
    for p in _LOG_P[1:]:
        y = _fma(y, m, p)
    y = y * m
    y = _fma(y, z, e * _LOG_Q1)
    y = _fma(-z, _HALF, y)
    return _fma(e, _LOG_Q2, m + y)


def _sincos256_ps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """avx_mathfun.h's sincos256_ps for x >= 0 (FMAs as in torch's build): Cephes' sinf/cosf."""
    j = (x * _FOUR_OVER_PI).astype(np.int32)
    j = (j + 1) & ~1
    y = j.astype(_F32)
    for dp in _DP:  # "extended precision modular arithmetic": x - y * pi/4 in three parts
        x = _fma(y, dp, x)
    z = x * x
    c = _fma(_fma(np.full_like(z, _COS_P[0]), z, _COS_P[1]), z, _COS_P[2]) * z
    c = _fma(c, z, -(z * _HALF)) + _ONE
    s = _fma(_fma(np.full_like(z, _SIN_P[0]), z, _SIN_P[1]), z, _SIN_P[2]) * z
    s = _fma(s, x, x)
    first = (j & 2) == 0
    sin = np.where(first, s, c)
    cos = np.where(first, c, s)
    return np.where((j & 4) != 0, -sin, sin), np.where((~(j - 2) & 4) != 0, -cos, cos)


def _box_muller_16(u: np.ndarray) -> np.ndarray:
    """torch's normal_fill_16 (AVX2 form) on blocks of 16 uniforms: 1 - u[0:8] gives the radius, u[8:16] the angle."""
    blocks = u.reshape(-1, 2, 8)
    radius = np.sqrt(_F32(-2) * _log256_ps(_ONE - blocks[:, 0]))
    sin, cos = _sincos256_ps(_TWO_PI * blocks[:, 1])
    return np.stack([radius * cos, radius * sin], axis=1).reshape(-1)


_CHUNK = 65536  # values per Box-Muller pass (a multiple of 16)


class _TorchCPU:
    """torch.Generator() on CPU: MT19937 words through NumPy's own MT19937, torch's transforms on top."""

    def __init__(self, seed: int):
        # torch's mt19937(seed) keeps only the low 32 bits (init_with_uint32), so 2**32 + s draws as s. NumPy's
        # legacy seeding of a 32-bit int is the same init_genrand, and leaves pos at 624: the first draw twists
        # the state first, as torch's engine does (left_ = 1).
        # (The RandomState's own bit generator: a fresh MT19937() would first seed itself from OS entropy.)
        self._bits = np.random.RandomState(seed & 0xFFFFFFFF)._bit_generator
        # integers() over the full uint32 range hands out the twister's 32-bit words in order, one each,
        # straight into a uint32 array (random_raw returns them widened to uint64: four times slower here).
        self._words = np.random.Generator(self._bits)
        self._next_double_normal: float | None = None  # CPUGeneratorImpl's cached second Box-Muller value

    def _uniform24(self, n: int) -> np.ndarray:
        # uniform_real_distribution<float>: the low 24 bits of one 32-bit word, times 2**-24.
        words = self._words.integers(0, 2**32, size=n, dtype=np.uint32)
        words &= np.uint32(0xFFFFFF)
        out = words.view(np.int32).astype(_F32)
        out *= _F32(2.0**-24)
        return out

    def _uniform53(self) -> float:
        # uniform_real_distribution<double>: random64() = (w1 << 32) | w2, low 53 bits, times 2**-53.
        w1, w2 = (int(w) for w in self._bits.random_raw(2))
        return (((w1 << 32) | w2) & ((1 << 53) - 1)) * 2.0**-53

    def _normal_double(self) -> float:
        if self._next_double_normal is not None:
            value, self._next_double_normal = self._next_double_normal, None
            return value
        u1, u2 = self._uniform53(), self._uniform53()
        r = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._next_double_normal = r * math.sin(theta)
        return r * math.cos(theta)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape)
        if n < 16:
            # Below 16 values torch takes normal_distribution<double> one value at a time.
            return np.array([self._normal_double() for _ in range(n)], _F64).astype(_F32).reshape(shape)
        out = self._uniform24(n)
        full = n - n % 16
        for start in range(0, full, _CHUNK):  # cache-sized pieces: twice as fast as one pass over a latent
            stop = min(start + _CHUNK, full)
            out[start:stop] = _box_muller_16(out[start:stop])
        if n % 16:
            # torch's tail rule: 16 fresh uniforms replace the last 16 values, overlapping the last full block.
            out[n - 16 :] = _box_muller_16(self._uniform24(16))
        return out.reshape(shape)


# ---------------------------------------------------------------------------------------------------
# "nv": AUTOMATIC1111's modules/rng_philox.py (stable-diffusion-webui commit ef1698fd6dbd6387341a1eeeded068ff1476ee50)
# ---------------------------------------------------------------------------------------------------

_PHILOX_M = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
# A1111 writes 2**-32 and 2 pi as these float32 literals; the products below are then taken in float64.
_INV_2_32 = float(_F32(2.3283064e-10))
_INV_2_32_2PI = float(_F32(2.3283064e-10 * 6.2831855))


def _philox4x32_10(counter: list[np.ndarray], key: tuple[int, int]) -> list[np.ndarray]:
    c0, c1, c2, c3 = (c.astype(np.uint32) for c in counter)
    k0, k1 = key
    for i in range(10):
        if i:
            k0, k1 = (k0 + _PHILOX_W[0]) & 0xFFFFFFFF, (k1 + _PHILOX_W[1]) & 0xFFFFFFFF
        p0 = c0.astype(np.uint64)
        p0 *= _PHILOX_M[0]
        p2 = c2.astype(np.uint64)
        p2 *= _PHILOX_M[1]
        # A little-endian (x86, Apple silicon) uint64 as uint32 pairs: low words at even places, high at odd (views).
        lo0, hi0 = p0.view(np.uint32)[0::2], p0.view(np.uint32)[1::2]
        lo2, hi2 = p2.view(np.uint32)[0::2], p2.view(np.uint32)[1::2]
        c0 = hi2 ^ c1
        c0 ^= np.uint32(k0)
        c2 = hi0 ^ c3
        c2 ^= np.uint32(k1)
        c1, c3 = lo2, lo0
    return [np.ascontiguousarray(c) for c in (c0, c1, c2, c3)]


class _Philox:
    """torch.randn(device="cuda") as A1111 computes it: one Philox call per element, the offset counting draws."""

    def __init__(self, seed: int):
        self._key = (seed & 0xFFFFFFFF, seed >> 32)
        self._offset = 0

    def _normals(self, start: int, stop: int) -> np.ndarray:
        index = np.arange(start, stop, dtype=np.uint64).astype(np.uint32)
        zeros = np.zeros(stop - start, np.uint32)
        offset = np.full(stop - start, self._offset & 0xFFFFFFFF, np.uint32)
        x, y, _, _ = _philox4x32_10([offset, zeros, index, zeros], self._key)
        # One Box-Muller value per element (the sine; the cosine and two words are thrown away).
        # sqrt(-2 log u) * sin(v) in float64, in place: the same operations in the same order as A1111's line.
        u = x * _INV_2_32
        u += _INV_2_32 / 2
        v = y * _INV_2_32_2PI
        v += _INV_2_32_2PI / 2
        np.log(u, out=u)
        u *= -2.0
        np.sqrt(u, out=u)
        u *= np.sin(v, out=v)
        return u.astype(_F32)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape)
        if n > 2**32:
            raise ValueError("the nv source draws at most 2**32 values at once")
        out = np.empty(n, _F32)
        for start in range(0, n, _CHUNK):
            out[start : start + _CHUNK] = self._normals(start, min(start + _CHUNK, n))
        self._offset += 1
        return out.reshape(shape)


# ---------------------------------------------------------------------------------------------------
# "mlx": the noise this package drew before (mx.random.normal in NHWC)
# ---------------------------------------------------------------------------------------------------


class _MLX:
    """The first draw is exactly the old pipeline's noise: mx.random.normal((B, H, W, C), key=mx.random.key(seed)).

    A (B, C, H, W) request draws in (B, H, W, C) and hands back the transpose, so the pipeline's NCHW -> NHWC
    transpose gives the old latent bit for bit. Shapes of other ranks are drawn as given. Later draws
    use the key chain k[i+1] = split(k[i])[1]; nothing depended on them before.
    """

    def __init__(self, seed: int):
        import mlx.core as mx

        self._mx = mx
        self._key = mx.random.key(seed)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        mx = self._mx
        nhwc = len(shape) == 4
        draw_shape = (shape[0], shape[2], shape[3], shape[1]) if nhwc else shape
        x = mx.random.normal(draw_shape, key=self._key).astype(mx.float32)
        self._key = mx.random.split(self._key)[1]
        x = np.array(x, dtype=_F32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if nhwc else x


_SOURCES = {"cpu": _TorchCPU, "nv": _Philox, "mlx": _MLX}


class NoiseGenerator:
    """One seeded stream of draws: ``g.randn(shape)`` (or ``g(shape)``) n times equals n successive
    ``torch.randn(shape, generator=gen)`` on one ``torch.Generator().manual_seed(seed)`` (for ``"cpu"``).

    ComfyUI's ancestral and SDE samplers draw their per-step noise this way from one generator seeded
    with the seed; a sampler takes this object as its ``noise(shape) -> array`` callable.
    """

    def __init__(self, seed: int, rng: str = "cpu"):
        self.seed = check_seed(seed)
        self.rng = check_rng(rng)
        self._source = _SOURCES[self.rng](self.seed)

    def randn(self, shape: Sequence[int]) -> np.ndarray:
        """float32 standard normal values of `shape` (torch order), the next draw of this stream."""
        return self._source.randn(_check_shape(shape))

    __call__ = randn


def randn(shape: Sequence[int], seed: int, rng: str = "cpu") -> np.ndarray:
    """float32 noise of `shape` (torch order, e.g. (B, 16, H/8, W/8)) from a fresh generator seeded with `seed`.

    ``rng="cpu"`` equals ``torch.randn(shape, generator=torch.Generator().manual_seed(seed))``: bit for bit
    against torch's x86 build (AVX2/AVX-512 machines, where torch uses avx_mathfun's log/sincos); torch's
    scalar kernel (Apple silicon, CPUs without AVX2) calls the platform's libm instead and differs from
    that build, and so from this, by up to ~2e-6 on about 40% of the values of a latent.
    ``rng="nv"`` equals A1111's NV source, ``rng="mlx"`` the noise of releases before these sources.
    """
    return NoiseGenerator(seed, rng).randn(shape)


def latent_noise(generator: NoiseGenerator, nhwc_shape: Sequence[int]) -> mx.array:
    """The generator's next draw for an NHWC latent (B, H, W, C), as a float32 MLX array.

    Drawn in torch's (B, C, H, W) order and transposed, so element [b, y, x, c] is torch's [b, c, y, x]: the
    same latent as diffusers' or ComfyUI's for "cpu", and the old pipeline's noise for a fresh "mlx" generator.
    """
    import mlx.core as mx

    b, h, w, c = _check_shape(nhwc_shape)
    return mx.array(generator.randn((b, c, h, w)).transpose(0, 2, 3, 1))
