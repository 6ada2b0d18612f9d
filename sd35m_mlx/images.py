"""Conversions between user images (PIL / numpy) and NHWC arrays in [-1, 1], and latents -> images."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np
from PIL import Image


def from_pil_or_array(image, height: int | None, width: int | None, multiple: int = 16) -> mx.array:
    """PIL image, (H, W, 3) / (B, H, W, 3) array in [0, 1] (float) or [0, 255] (uint8) -> NHWC in [-1, 1].

    Resized (Lanczos, as diffusers' image processor) to height x width when given, else to the
    image's own size rounded down to `multiple`.
    """
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        w = width or image.width // multiple * multiple
        h = height or image.height // multiple * multiple
        if (w, h) != image.size:
            image = image.resize((w, h), Image.Resampling.LANCZOS)
        arr = np.asarray(image, dtype=np.float32)[None] / 255.0
    else:
        arr = np.asarray(image)
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        arr = arr.astype(np.float32)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"image array must be (H, W, 3) or (B, H, W, 3) RGB, got shape {arr.shape}")
        if (height and arr.shape[1] != height) or (width and arr.shape[2] != width):
            arr = np.stack(
                [
                    np.asarray(
                        Image.fromarray((a * 255).round().clip(0, 255).astype(np.uint8)).resize(
                            (width or a.shape[1] // multiple * multiple, height or a.shape[0] // multiple * multiple),
                            Image.Resampling.LANCZOS,
                        ),
                        dtype=np.float32,
                    )
                    / 255.0
                    for a in arr
                ]
            )
        elif arr.shape[1] % multiple or arr.shape[2] % multiple:
            h, w = arr.shape[1] // multiple * multiple, arr.shape[2] // multiple * multiple
            arr = arr[:, :h, :w]
    if arr.shape[1] < multiple or arr.shape[2] < multiple:
        raise ValueError(f"image is too small: {arr.shape[2]}x{arr.shape[1]} (needs at least {multiple}px)")
    return mx.array(arr * 2.0 - 1.0)


def to_output(images: mx.array, output_type: str):
    """NHWC float in [0, 1] -> float32 numpy (output_type "np") or a list of PIL images."""
    arr = np.array(images.astype(mx.float32))
    if output_type == "np":
        return arr
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def decode_latents(
    decoder, latents: mx.array, dtype: mx.Dtype, decode: Callable[[mx.array], mx.array] | None = None
) -> mx.array:
    """Model-space latents NHWC (what the transformer denoises) -> images NHWC float32 in [0, 1], lazy.

    The steps of diffusers' SD3 pipeline, for the VAE or TAESD (`decoder`: its `unscale_latents` and
    `decode`, or `decode` instead, e.g. the tiled VAE): latents / scaling_factor + shift_factor, decode
    in `dtype`, then x / 2 + 0.5 clipped to [0, 1].
    """
    decode = decode or decoder.decode
    images = decode(decoder.unscale_latents(latents.astype(mx.float32)).astype(dtype))
    return mx.clip(images.astype(mx.float32) / 2 + 0.5, 0.0, 1.0)
