"""torch.nn.functional.interpolate's 2-D resampling (align_corners=False) in NumPy, for A1111's latent upscalers.

A1111's hires fix with a "Latent*" upscaler resizes the first pass's latents with
`torch.nn.functional.interpolate(samples, size=..., mode=..., antialias=...)` (modules/processing.py,
StableDiffusionProcessingTxt2Img.sample at commit 0027ce1f6e58c5f4279173e468a60aef420babfe); to start the
second pass from the same latents we resample as torch does. Every mode is linear, so each axis is one
(out, in) weight matrix built from torch's index and weight rules (aten/src/ATen/native/UpSample.h and
cpu/UpSampleKernel.cpp): nearest and nearest-exact pick one source index in float32 as torch does; bilinear
and bicubic (A = -0.75) clamp at the edges; with antialias, bilinear and bicubic (A = -0.5, as PIL) use
torch's separable filter whose support widens by the scale when shrinking, normalised per output pixel.
"""

from __future__ import annotations

import numpy as np

MODES = ("bilinear", "bicubic", "nearest", "nearest-exact")


def interpolate(x, size: tuple[int, int], mode: str = "bilinear", antialias: bool = False) -> np.ndarray:
    """NHWC `x` resized to `size` = (height, width) as torch's F.interpolate on the NCHW array; float32."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if antialias and mode not in ("bilinear", "bicubic"):
        raise ValueError(f"antialias applies to bilinear and bicubic, not {mode}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC (4 dimensions), got shape {x.shape}")
    rows = axis_weights(x.shape[1], size[0], mode, antialias)
    cols = axis_weights(x.shape[2], size[1], mode, antialias)
    return np.einsum("oh,nhwc,pw->nopc", rows, x, cols, optimize=True).astype(np.float32)


def axis_weights(n_in: int, n_out: int, mode: str, antialias: bool = False) -> np.ndarray:
    """The (n_out, n_in) matrix that resamples one axis as torch does."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got {n_in} -> {n_out}")
    w = np.zeros((n_out, n_in), np.float64)
    out = np.arange(n_out)
    scale = np.float32(n_in) / np.float32(n_out)  # torch's float scale when a size is given
    if mode in ("nearest", "nearest-exact"):
        if mode == "nearest" and n_out == n_in:
            src = out
        elif mode == "nearest" and n_out == 2 * n_in:
            src = out >> 1
        else:
            offset = np.float32(0.5 if mode == "nearest-exact" else 0.0)
            src = np.floor((out.astype(np.float32) + offset) * scale).astype(np.int64)
        w[out, np.minimum(src, n_in - 1)] = 1.0
        return w
    if antialias:
        return _antialias_weights(n_in, n_out, float(scale), mode)
    src = scale * (out.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)
    if mode == "bilinear":
        src = np.maximum(src, 0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        lam = np.clip(src - i0, 0, 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        np.add.at(w, (out, i0), 1 - lam)
        np.add.at(w, (out, i1), lam)
        return w
    i = np.floor(src).astype(np.int64)
    t = (src - i).astype(np.float64)
    coeffs = (_cubic2(t + 1), _cubic1(t), _cubic1(1 - t), _cubic2(2 - t))
    for k, c in enumerate(coeffs):
        np.add.at(w, (out, np.clip(i - 1 + k, 0, n_in - 1)), c)
    return w


def _cubic1(x, a: float = -0.75):
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic2(x, a: float = -0.75):
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def _aa_filter(x: np.ndarray, mode: str) -> np.ndarray:
    x = np.abs(x)
    if mode == "bilinear":
        return np.where(x < 1, 1 - x, 0.0)
    a = -0.5
    return np.where(x < 1, _cubic1(x, a), np.where(x < 2, _cubic2(x, a), 0.0))


def _antialias_weights(n_in: int, n_out: int, scale: float, mode: str) -> np.ndarray:
    size = 2 if mode == "bilinear" else 4
    support = size * 0.5 * scale if scale >= 1 else size * 0.5
    invscale = 1 / scale if scale >= 1 else 1.0
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        k = _aa_filter((j - center + 0.5) * invscale, mode)
        total = k.sum()
        w[i, lo:hi] = k / total if total != 0 else k
    return w
