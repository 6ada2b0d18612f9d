"""Decode denoised latents with TAESD instead of the VAE: fast drafts and live previews."""

from __future__ import annotations

import mlx.core as mx

from .loading.safetensors_io import materialize
from .models.taesd import AutoencoderTiny


def decode_with_taesd(taesd: AutoencoderTiny, latents: mx.array) -> mx.array:
    """Model-space latents NHWC (what the transformer denoises) -> images NHWC float32 in [0, 1], evaluated.

    The steps of generate()'s VAE decode and of diffusers' SD3 pipeline with `vae=AutoencoderTiny`:
    latents / scaling_factor + shift_factor, decode, then x / 2 + 0.5 clipped to [0, 1].
    """
    images = taesd.decode(taesd.unscale_latents(latents.astype(mx.float32)).astype(taesd.dtype))
    images = mx.clip(images.astype(mx.float32) / 2 + 0.5, 0.0, 1.0)
    mx.eval(images)
    return images


def load_taesd_evaluated(source, dtype: mx.Dtype):
    """The TAESD3 decoder from a Hub id, folder or file, evaluated (usable from any thread)."""
    from .loading.taesd import load_taesd  # lazily: loading pulls in the hub client

    taesd = load_taesd(source, dtype)
    materialize(taesd)
    return taesd
