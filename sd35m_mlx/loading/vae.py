"""Load the AutoencoderKL from a diffusers-layout `vae/` folder."""

from __future__ import annotations

import os

import mlx.core as mx

from ..models.vae import AutoencoderKL, VAEConfig
from .safetensors_io import load_component


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
    return load_component(folder, VAEConfig, AutoencoderKL, dtype, "AutoencoderKL", sanitize_vae_weights)
