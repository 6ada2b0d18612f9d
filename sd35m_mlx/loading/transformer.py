"""Load the MMDiT from a diffusers-layout `transformer/` folder."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from ..models.mmdit import MMDiTConfig, SD3Transformer2DModel
from .safetensors_io import load_into, load_safetensors, read_config_as


def sanitize_transformer_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """PyTorch Conv2d weights are OIHW; MLX wants OHWI."""
    w = weights.get("pos_embed.proj.weight")
    if w is not None and w.ndim == 4:
        weights["pos_embed.proj.weight"] = w.transpose(0, 2, 3, 1)
    return weights


def load_transformer(folder: str | os.PathLike, dtype: mx.Dtype = mx.float32) -> SD3Transformer2DModel:
    folder = Path(folder)
    config = read_config_as(folder, MMDiTConfig, "SD3 transformer")
    weights, origin = load_safetensors(folder, dtype)
    model = SD3Transformer2DModel(config)
    if dtype != mx.float32:
        model.set_dtype(dtype)
    load_into(model, sanitize_transformer_weights(weights), origin, what="transformer")
    return model
