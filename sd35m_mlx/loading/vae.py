"""Load the AutoencoderKL from a diffusers-layout `vae/` folder."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from ..models.vae import AutoencoderKL, VAEConfig
from .safetensors_io import load_into, load_safetensors, read_config_as


def sanitize_vae_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """PyTorch Conv2d weights are OIHW; MLX wants OHWI.

    Old checkpoints store the mid-block attention projections as 1x1 convs: those become Linear weights.
    """
    out = {}
    for k, v in weights.items():
        if v.ndim == 4:
            v = v.reshape(v.shape[:2]) if ".attentions." in k else v.transpose(0, 2, 3, 1)
        out[k] = v
    return out


def load_vae(folder: str | os.PathLike, dtype: mx.Dtype = mx.float32) -> AutoencoderKL:
    folder = Path(folder)
    config = read_config_as(folder, VAEConfig, "AutoencoderKL")
    weights, origin = load_safetensors(folder, dtype)
    model = AutoencoderKL(config)
    if dtype != mx.float32:
        model.set_dtype(dtype)
    load_into(model, sanitize_vae_weights(weights), origin, what="vae")
    return model
