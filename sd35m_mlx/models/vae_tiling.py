"""Tiled VAE decode and encode: memory bounded by one tile for any image size, GroupNorm statistics
shared across tiles, tiles blended with smooth weights.

What is tiled. Only the full-resolution parts run tile by tile (the decoder's up blocks and output
convs, the encoder's input conv and down blocks). The parts at latent resolution run on the whole
latent: the decoder's conv_in and mid block, the encoder's mid block and output convs. They are
small (a 2048 px image has a 256 x 256 latent) and hold the VAE's only global operation, the
mid-block attention, which per-tile attention would change.

GroupNorm statistics. A tile normalised with its own statistics shifts tone against its neighbours
(flat areas show the tile grid: diffusers PR #1441, stable-diffusion.cpp #353). Exact whole-image
statistics need every GroupNorm's input over the whole image, which is what untiled decoding holds
in memory. So a first tiled pass records, at every GroupNorm, each tile's own statistics and the
whole image's (each tile adds the part of the grid it owns: the owned parts partition the image,
so every pixel counts once; combined with Chan's parallel-variance formula in float64). The second
pass normalises each tile with its live statistics moved onto the whole image's: mean + (image
mean - own pass-1 mean), variance x (image variance / own pass-1 variance). Applying the recorded
image statistics as they are does worse: the pass-1 figures came from activations that used
per-tile statistics, and with fixed statistics a tile no longer corrects the drift of earlier layers
(it scored below per-tile statistics; moved live statistics above). Costs one more pass; the PSNR of
each variant against the untiled decode is in benchmarks/README.md ("Big images").

Blending. Neighbouring tiles overlap; across an overlap one tile's weight falls along a smootherstep
ramp while the other's rises (they sum to one), and the output is divided by the summed weights.
A tile's border pixels, where its zero padding differs from the real neighbourhood, so get almost
no weight. Memory is the untiled parts plus one tile's decode plus float32 output and weight sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .vae_blocks import GroupNorm

Stage = Callable[[mx.array], mx.array]

MIN_TILE = 8  # latent px; the pipeline's tiles are >= 64 latent px (512 px), tests use small ones


@dataclass(frozen=True)
class Span:
    """One tile along one axis, in grid (latent) units: [start, end) decoded, [core_start, core_end) owned."""

    start: int
    end: int
    core_start: int
    core_end: int


def tile_spans(size: int, tile: int, overlap: int) -> list[Span]:
    """Tiles of `tile` covering [0, size) with at least `overlap` between neighbours, spread evenly.

    Each tile owns the grid from the middle of its overlap with the previous tile to the middle of
    its overlap with the next, so the owned parts partition [0, size).
    """
    if size <= tile:
        return [Span(0, size, 0, size)]
    n = math.ceil((size - overlap) / (tile - overlap))
    starts = [round(i * (size - tile) / (n - 1)) for i in range(n)]
    cuts = [0] + [(starts[i + 1] + starts[i] + tile) // 2 for i in range(n - 1)] + [size]
    return [Span(s, s + tile, cuts[i], cuts[i + 1]) for i, s in enumerate(starts)]


def smootherstep(t: np.ndarray) -> np.ndarray:
    """6t^5 - 15t^4 + 10t^3: 0 -> 1 with zero first and second derivatives at both ends; S(1-t) = 1 - S(t)."""
    return t * t * t * (t * (6 * t - 15) + 10)


def blend_weights(spans: Sequence[Span], i: int, factor: int) -> np.ndarray:
    """Weights along one axis of tile i at output resolution (grid x factor): smootherstep up across
    the overlap with the previous tile, down across the overlap with the next, 1 elsewhere, never 0."""
    span = spans[i]
    weight = np.ones((span.end - span.start) * factor, np.float64)
    if i > 0:
        n = (spans[i - 1].end - span.start) * factor
        weight[:n] *= smootherstep((np.arange(n) + 0.5) / n)
    if i + 1 < len(spans):
        n = (span.end - spans[i + 1].start) * factor
        weight[len(weight) - n :] *= smootherstep((np.arange(n)[::-1] + 0.5) / n)
    return weight


class SharedStatistics:
    """Per-GroupNorm (mean, variance) over the whole image, accumulated from the tiles' owned parts."""

    def __init__(self):
        self._sums: dict[int, tuple[float, np.ndarray, np.ndarray]] = {}  # id(norm) -> (count, mean, M2)

    def add(self, norm: GroupNorm, x: mx.array, tile_shape: tuple[int, int], core: tuple[int, int, int, int]):
        """Add the statistics of the owned part `core` (grid units, relative to the tile) of x."""
        sy, sx = x.shape[1] // tile_shape[0], x.shape[2] // tile_shape[1]
        y0, y1, x0, x1 = core
        mean, var = norm.statistics(x[:, y0 * sy : y1 * sy, x0 * sx : x1 * sx])
        n_b = float((y1 - y0) * sy * (x1 - x0) * sx)
        mean_b = np.array(mean[:, 0], np.float64)
        m2_b = np.array(var[:, 0], np.float64) * n_b
        key = id(norm)
        if key not in self._sums:
            self._sums[key] = (n_b, mean_b, m2_b)
            return
        n_a, mean_a, m2_a = self._sums[key]
        n = n_a + n_b
        delta = mean_b - mean_a
        self._sums[key] = (n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n)

    def get(self, norm: GroupNorm) -> tuple[mx.array, mx.array]:
        n, mean, m2 = self._sums[id(norm)]
        return mx.array(mean[:, None].astype(np.float32)), mx.array((m2 / n)[:, None].astype(np.float32))


@contextmanager
def _overriding(norms: Sequence[GroupNorm], hook) -> Iterator[None]:
    for norm in norms:
        norm.statistics_override = hook
    try:
        yield
    finally:
        for norm in norms:
            norm.statistics_override = None


def _run(steps: Sequence[Stage], x: mx.array) -> mx.array:
    for step in steps:
        x = step(x)
        mx.eval(x)
    return x


def run_tiled(
    steps: Sequence[Stage],
    x: mx.array,
    norms: Sequence[GroupNorm],
    *,
    in_factor: int,
    out_factor: int,
    tile: int,
    overlap: int,
    shared_statistics: bool = True,
) -> mx.array:
    """Run `steps` over x (B, H, W, C) tile by tile and blend the tiles; float32 result.

    The grid is x's size / in_factor; a tile of t grid px reads t * in_factor px of x and yields
    t * out_factor px. `norms` are the GroupNorms inside `steps`: with shared_statistics they
    normalise with statistics moved onto the whole image's, from a first tiled pass (module docstring).
    """
    if not MIN_TILE <= tile or not 0 <= overlap <= tile // 2:
        raise ValueError(f"tiles must be >= {MIN_TILE} latent px with overlap in [0, tile/2], got {tile}, {overlap}")
    b, h, w = x.shape[0], x.shape[1] // in_factor, x.shape[2] // in_factor
    rows, cols = tile_spans(h, tile, overlap), tile_spans(w, tile, overlap)
    tiles = [(r, c) for r in rows for c in cols]

    def tile_input(r: Span, c: Span) -> mx.array:
        f = in_factor
        return x[:, r.start * f : r.end * f, c.start * f : c.end * f]

    # Pass 1: each tile normalises with its own statistics; record those, and the whole image's from the owned parts.
    stats = SharedStatistics() if shared_statistics else None
    own: dict[tuple, tuple[mx.array, mx.array]] = {}  # (tile, id(norm)) -> the tile's own (mean, var) in pass 1
    current = None

    def collect(norm, a):
        r, c = current
        core = (r.core_start - r.start, r.core_end - r.start, c.core_start - c.start, c.core_end - c.start)
        stats.add(norm, a, (r.end - r.start, c.end - c.start), core)
        own[current, id(norm)] = mean_var = norm.statistics(a)
        mx.eval(mean_var)
        return mean_var

    def corrected(norm, a):
        mean, var = norm.statistics(a)
        own_mean, own_var = own[current, id(norm)]
        g_mean, g_var = stats.get(norm)
        return mean + (g_mean - own_mean), var * ((g_var + norm.eps) / (own_var + norm.eps))

    if stats is not None:
        with _overriding(norms, collect):
            for current in tiles:
                _run(steps, tile_input(*current))

    out = weights = None
    row_w = [blend_weights(rows, i, out_factor) for i in range(len(rows))]
    col_w = [blend_weights(cols, j, out_factor) for j in range(len(cols))]
    with _overriding(norms, corrected if stats is not None else None):
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                current = (r, c)
                part = np.array(_run(steps, tile_input(r, c)).astype(mx.float32))
                if out is None:
                    out = np.zeros((b, h * out_factor, w * out_factor, part.shape[-1]), np.float32)
                    weights = np.zeros((h * out_factor, w * out_factor), np.float64)
                weight = np.outer(row_w[i], col_w[j])
                ys = slice(r.start * out_factor, r.end * out_factor)
                xs = slice(c.start * out_factor, c.end * out_factor)
                out[:, ys, xs] += part * weight[None, :, :, None].astype(np.float32)
                weights[ys, xs] += weight
    return mx.array(out / weights[None, :, :, None].astype(np.float32))


def _norms(module) -> list[GroupNorm]:
    return [m for _, m in module.named_modules() if isinstance(m, GroupNorm)]


def _split_at(steps: list[Stage], module) -> int:
    return next(i for i, s in enumerate(steps) if s is module)


def decode_tiled(vae, z: mx.array, tile: int = 64, overlap: int = 16, **kwargs) -> mx.array:
    """`vae.decode(z)` in tiles of `tile` latent px overlapping by `overlap` (z NHWC, unscaled).

    A latent that fits in one tile decodes exactly as `vae.decode`. shared_statistics=False (in
    kwargs) normalises each tile with its own statistics: one pass instead of two, tone shifts.
    """
    if z.shape[1] <= tile and z.shape[2] <= tile:
        return vae.decode(z)
    steps = vae.decoder.stages()
    if "post_quant_conv" in vae:
        steps.insert(0, vae.post_quant_conv)
    split = _split_at(steps, vae.decoder.mid_block) + 1
    h = _run(steps[:split], z)
    local = [m for m in vae.decoder.up_blocks] + [vae.decoder.conv_norm_out]
    out = run_tiled(
        steps[split:],
        h,
        [n for m in local for n in _norms(m)],
        in_factor=1,
        out_factor=vae.config.downscale,
        tile=tile,
        overlap=overlap,
        **kwargs,
    )
    return out.astype(z.dtype)


def encode_moments_tiled(vae, images: mx.array, tile: int = 64, overlap: int = 16, **kwargs):
    """`vae.encode_moments(images)` in tiles of `tile` latent px (tile x 8 image px), overlapping by `overlap`."""
    f = vae.config.downscale
    if images.shape[1] <= tile * f and images.shape[2] <= tile * f:
        return vae.encode_moments(images)
    if images.shape[1] % f or images.shape[2] % f:
        raise ValueError(f"tiled encoding needs image sides that are multiples of {f}, got {images.shape[1:3]}")
    enc = vae.encoder
    steps = enc.stages()
    split = _split_at(steps, enc.mid_block)
    features = run_tiled(
        steps[:split],
        images,
        [n for m in [enc.conv_in, *enc.down_blocks] for n in _norms(m)],
        in_factor=f,
        out_factor=1,
        tile=tile,
        overlap=overlap,
        **kwargs,
    )
    rest = steps[split:]
    if "quant_conv" in vae:
        rest.append(vae.quant_conv)
    moments = _run(rest, features.astype(images.dtype))
    mean, logvar = mx.split(moments, 2, axis=-1)
    return mean, mx.clip(logvar, -30.0, 20.0)


def encode_tiled(vae, images: mx.array, tile: int = 64, overlap: int = 16, **kwargs) -> mx.array:
    """`vae.encode(images)` (the latent mean) in tiles; see `encode_moments_tiled`."""
    return encode_moments_tiled(vae, images, tile, overlap, **kwargs)[0]
