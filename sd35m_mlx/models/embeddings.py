"""Input embedders of the MMDiT: patches + cropped positional table, timestep, pooled text."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


class PatchEmbed(nn.Module):
    """Conv patchify (NHWC) plus a centred crop of the stored (1, M*M, D) positional table."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, pos_embed_max_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.max_size = pos_embed_max_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = mx.zeros((1, pos_embed_max_size * pos_embed_max_size, dim))

    def cropped_pos_embed(self, h: int, w: int) -> mx.array:
        """Positional table for an h x w patch grid, (1, h*w, D)."""
        m = self.max_size
        if h > m or w > m:
            raise ValueError(
                f"latent of {h}x{w} patches exceeds the positional table ({m}x{m} patches, {m * self.patch_size * 8}px)"
            )
        top, left = (m - h) // 2, (m - w) // 2
        table = self.pos_embed.reshape(m, m, -1)[top : top + h, left : left + w]
        return table.reshape(1, h * w, -1)

    def __call__(self, x: mx.array, pos: mx.array | None = None) -> mx.array:
        x = self.proj(x)  # (B, h, w, D)
        b, h, w, d = x.shape
        if pos is None:
            pos = self.cropped_pos_embed(h, w)
        return x.reshape(b, h * w, d) + pos


def timestep_embedding(t: mx.array, dim: int = 256, max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding laid out [cos, sin] (diffusers flip_sin_to_cos=True, shift 0), float32."""
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    args = t.astype(mx.float32)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


class MLPEmbedder(nn.Module):
    """Linear, SiLU, Linear (diffusers TimestepEmbedding / PixArtAlphaTextProjection keys)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class CombinedTimestepTextProjEmbeddings(nn.Module):
    def __init__(self, dim: int, pooled_projection_dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.timestep_embedder = MLPEmbedder(frequency_dim, dim)
        self.text_embedder = MLPEmbedder(pooled_projection_dim, dim)

    def __call__(self, timestep: mx.array, pooled: mx.array) -> mx.array:
        t = timestep_embedding(timestep, self.frequency_dim).astype(pooled.dtype)
        return self.timestep_embedder(t) + self.text_embedder(pooled)
