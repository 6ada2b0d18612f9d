"""Load the MMDiT from a diffusers-layout `transformer/` folder."""

from __future__ import annotations

import os

import mlx.core as mx

from ..models.mmdit import MMDiTConfig, SD3Transformer2DModel
from .safetensors_io import load_component


def sanitize_transformer_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """PyTorch Conv2d weights are OIHW; MLX wants OHWI."""
    w = weights.get("pos_embed.proj.weight")
    if w is not None and w.ndim == 4:
        weights["pos_embed.proj.weight"] = w.transpose(0, 2, 3, 1)
    return weights


def load_transformer(folder: str | os.PathLike, dtype: mx.Dtype = mx.float32) -> SD3Transformer2DModel:
    return load_component(
        folder, MMDiTConfig, SD3Transformer2DModel, dtype, "SD3 transformer", sanitize_transformer_weights
    )
